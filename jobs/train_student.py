"""Distil the MobileNetV2 student from cached teacher logits with Ray Train (``--kd.alpha 0`` = no-KD baseline).

    python -m jobs.train_student --config configs/student.yaml --kd.cache CACHE_URI [--key value ...]
"""

from kdray.cli import run_job
from kdray.train import train_job

JOB_DEFAULTS = {"model": {"name": "student"}, "kd": {"alpha": 0.5, "temperature": 4.0, "views": 0}}  # 0: every cached view


def main(argv: list[str]) -> dict:
    return train_job(argv, JOB_DEFAULTS, "student")


if __name__ == "__main__":
    run_job(main)
