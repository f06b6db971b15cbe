"""Train the ResNet50V2+VGG19 teacher data-parallel with Ray Train.

    python -m jobs.train_teacher --config configs/teacher.yaml [--key value ...]
"""

from kdray.cli import run_job
from kdray.config import TrainJobConfig, load_config
from kdray.train import fit

JOB_DEFAULTS = {"model": {"name": "teacher"}}


def main(argv: list[str]) -> dict:
    cfg = load_config(TrainJobConfig, argv, JOB_DEFAULTS)
    summary = fit(cfg)
    print(f"teacher run: {summary['run_uri']}\nbest checkpoint: {summary['best_checkpoint']}\n"
          f"best val: {summary['best_metrics']}")
    return summary


if __name__ == "__main__":
    run_job(main)
