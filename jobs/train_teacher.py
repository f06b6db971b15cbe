"""Train the ResNet50V2+VGG19 teacher data-parallel with Ray Train.

    python -m jobs.train_teacher --config configs/teacher.yaml [--key value ...]
"""

from kdray.cli import run_job
from kdray.train import train_job

JOB_DEFAULTS = {"model": {"name": "teacher"}}


def main(argv: list[str]) -> dict:
    return train_job(argv, JOB_DEFAULTS, "teacher")


if __name__ == "__main__":
    run_job(main)
