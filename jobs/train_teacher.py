"""Train the ResNet50V2+VGG19 teacher data-parallel with Ray Train.

    python -m jobs.train_teacher --config configs/teacher.yaml [--key value ...]
"""

from kdray.config import TrainJobConfig, load_config
from kdray.data import load_training_data
from kdray.runner import run_job
from kdray.schemas import RunSummary
from kdray.train import fit, run_report

JOB_DEFAULTS = {"model": {"name": "teacher"}}


def main(argv: list[str]) -> RunSummary:
    cfg = load_config(TrainJobConfig, argv, JOB_DEFAULTS)
    summary = fit(cfg, load_training_data(cfg.data, cfg.run.seed))
    print(run_report("teacher", summary))
    return summary


if __name__ == "__main__":
    run_job(main)
