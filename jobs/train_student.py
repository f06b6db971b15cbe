"""Distil the MobileNetV2 student from cached teacher logits with Ray Train (``--kd.alpha 0`` = no-KD baseline).

    python -m jobs.train_student --config configs/student.yaml --kd.cache CACHE_URI [--key value ...]
"""

from kdray import KdrayError, logit_cache
from kdray.config import TrainJobConfig, load_config
from kdray.runner import run_job
from kdray.schemas import RunSummary
from kdray.data import load_training_data
from kdray.train import fit, run_report

JOB_DEFAULTS = {"model": {"name": "student"}, "kd": {"alpha": 0.5, "temperature": 4.0, "views": 0}}  # 0: every cached view


def main(argv: list[str]) -> RunSummary:
    cfg = load_config(TrainJobConfig, argv, JOB_DEFAULTS)
    if cfg.kd.alpha > 0 and not cfg.kd.cache:
        raise KdrayError("--kd.cache is required when --kd.alpha > 0 (build one with jobs.build_cache)")
    data = load_training_data(cfg.data, cfg.run.seed)
    if cfg.kd.alpha > 0:
        data = logit_cache.with_teacher_logits(data, cfg.kd)
    summary = fit(cfg, data)
    print(run_report("student", summary))
    return summary


if __name__ == "__main__":
    run_job(main)
