"""Fit temperature scaling and the COVID operating point on a held-out split; store them with the model.

    python -m jobs.calibrate --model RUN_OR_CHECKPOINT --data ROOT [--split val] [--target_sensitivity 0.95]

Writes ``temperature``, ``covid_threshold`` and the reports ``calibration`` / ``validation`` into
the checkpoint's meta.json. Export copies them into the model card; scoring and serving then flag
``covid_suspect`` when P(covid) reaches the threshold. Run it before jobs.export.
"""

from kdray.calibrate import calibrate_checkpoint
from kdray.runner import run_job
from kdray.config import CalibrateJobConfig, load_config
from kdray.schemas import CalibrationReport


def main(argv: list[str]) -> CalibrationReport:
    cfg = load_config(CalibrateJobConfig, argv)
    c = calibrate_checkpoint(cfg.model, cfg.data.root, cfg.calibrate.split, cfg.calibrate.target_sensitivity,
                             cfg.data.limit)
    crossed = c.cross_fitted
    print(f"temperature {c.temperature:.4f}: ECE on {c.split} {c.ece_before:.4f} -> {c.ece_after:.4f} "
          f"(2-fold cross-fitted {crossed['ece_after']})\n"
          f"covid threshold {c.covid_threshold} for sensitivity >= {c.target_sensitivity:.0%}: "
          f"{c.covid_at_threshold} (cross-fitted sensitivity {crossed['sensitivity']}, "
          f"specificity {crossed['specificity']})")
    return c


if __name__ == "__main__":
    run_job(main)
