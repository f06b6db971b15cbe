"""Post-training calibration: temperature scaling and the COVID operating point, stored with the model.

``calibrate_checkpoint`` runs a checkpoint over a held-out split (val by default), fits the
temperature ``T`` that minimises the NLL of ``softmax(logits / T)``, picks the largest
P(covid) threshold that reaches the target sensitivity on the calibrated probabilities, and
writes both into the checkpoint's ``meta.json`` (``temperature``, ``covid_threshold``, and the
reports ``calibration`` and ``validation``). Everything downstream reads them from there:
evaluation, export (the model card), offline scoring and serving (``covid_suspect``).

The split used for fitting is also the split the numbers are reported on, so the in-sample
ECE and sensitivity are optimistic by construction. ``calibration.cross_fitted`` therefore also
reports a 2-fold estimate: fit on one half of the split, measure on the other, and average.
"""

from __future__ import annotations

import logging

from kdray import KdrayError
from kdray.checkpoints import read_checkpoint_meta, resolve_checkpoint, write_checkpoint_meta
from kdray.evaluate import SplitLogits, split_logits
from kdray.metrics import calibration_report, classification_metrics, softmax, validation_summary
from kdray.schemas import CalibrationReport

log = logging.getLogger(__name__)

def calibrate_checkpoint(model_uri: str, data_root: str, split: str = "val", target_sensitivity: float = 0.95,
                         limit: int = 0) -> CalibrationReport:
    """Fit T and the covid threshold on ``split`` (listed and decoded here) and write them into the checkpoint:
    :func:`calibrate_on_logits` of the raw model's :func:`kdray.evaluate.split_logits`."""
    _check_target(target_sensitivity)
    folder = resolve_checkpoint(model_uri)
    # the raw model: a previous calibration must not feed into this one
    return calibrate_on_logits(folder, split_logits(folder, data_root, split, backend="torch", limit=limit),
                               target_sensitivity)


def calibrate_on_logits(model_uri: str, out: SplitLogits, target_sensitivity: float = 0.95) -> CalibrationReport:
    """Fit T and the covid threshold on the checkpoint's torch logits over a held-out split and write them, with
    the reports, into its meta.json. Returns the calibration report."""
    _check_target(target_sensitivity)
    folder = resolve_checkpoint(model_uri)
    meta = read_checkpoint_meta(folder)
    classes = out.classes
    report = calibration_report(out.y, out.logits, classes, target_sensitivity).model_copy(
        update={"split": out.split, "data": out.data_root})
    metrics = classification_metrics(out.y, softmax(out.logits, report.temperature), classes, out.sources,
                                     report.covid_threshold)
    meta = meta.model_copy(update={"temperature": report.temperature, "covid_threshold": report.covid_threshold,
                                   "calibration": report.model_dump(mode="json"),
                                   "validation": {"split": out.split, **validation_summary(metrics)}})
    write_checkpoint_meta(folder, meta)
    log.info("calibrated %s on %s (%d images): T=%.3f, ECE %.4f -> %.4f, covid threshold %s for sensitivity %.2f",
             folder, out.split, report.n, report.temperature, report.ece_before, report.ece_after,
             report.covid_threshold, target_sensitivity)
    return report


def _check_target(target_sensitivity: float) -> None:
    if not 0 < target_sensitivity <= 1:
        raise KdrayError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
