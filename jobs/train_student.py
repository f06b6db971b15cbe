"""Distil the MobileNetV2 student from cached teacher logits with Ray Train (``--kd.alpha 0`` = no-KD baseline).

    python -m jobs.train_student --config configs/student.yaml --kd.cache CACHE_URI [--key value ...]
"""

from kdray.cli import run_job
from kdray.config import TrainJobConfig, load_config
from kdray.train import fit

JOB_DEFAULTS = {"model": {"name": "student"}, "kd": {"alpha": 0.5, "temperature": 4.0}}


def main(argv: list[str]) -> dict:
    cfg = load_config(TrainJobConfig, argv, JOB_DEFAULTS)
    summary = fit(cfg)
    print(f"student run: {summary['run_uri']}\nbest checkpoint: {summary['best_checkpoint']}\n"
          f"best val: {summary['best_metrics']}")
    return summary


if __name__ == "__main__":
    run_job(main)
