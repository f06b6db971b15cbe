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

import numpy as np

from kdray import KdrayError, storage
from kdray.evaluate import (
    classification_metrics,
    covid_threshold_for_sensitivity,
    expected_calibration_error,
    fit_temperature,
    softmax,
)

log = logging.getLogger(__name__)


def _threshold(y: np.ndarray, probs: np.ndarray, classes: list[str], target: float) -> float | None:
    try:
        return covid_threshold_for_sensitivity(y, probs, classes, target)
    except ValueError as exc:  # no covid class, or no covid images in this split
        log.warning("no covid threshold: %s", exc)
        return None


def _covid_rates(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None) -> dict:
    covid = classification_metrics(y, probs, classes, covid_threshold=threshold).get("covid") or {}
    return {"sensitivity": covid.get("sensitivity"), "specificity": covid.get("specificity")}


def calibration_report(y: np.ndarray, logits: np.ndarray, classes: list[str], target_sensitivity: float = 0.95,
                       seed: int = 0) -> dict:
    """Temperature, covid threshold and ECE before/after, in-sample and 2-fold cross-fitted."""
    from sklearn.model_selection import StratifiedKFold

    y, logits = np.asarray(y, dtype=np.int64), np.asarray(logits, dtype=np.float64)
    temperature = fit_temperature(logits, y)
    calibrated = softmax(logits, temperature)
    threshold = _threshold(y, calibrated, classes, target_sensitivity)
    report = {"temperature": temperature, "covid_threshold": threshold, "target_sensitivity": target_sensitivity,
              "n": int(len(y)), "ece_before": expected_calibration_error(softmax(logits), y),
              "ece_after": expected_calibration_error(calibrated, y),
              "covid_at_threshold": _covid_rates(y, calibrated, classes, threshold)}
    folds = []
    if np.bincount(y).min(initial=len(y)) >= 2:
        for fit_idx, test_idx in StratifiedKFold(2, shuffle=True, random_state=seed).split(logits, y):
            t = fit_temperature(logits[fit_idx], y[fit_idx])
            held_out = softmax(logits[test_idx], t)
            folds.append({"ece_after": expected_calibration_error(held_out, y[test_idx]),
                          **_covid_rates(y[test_idx], held_out, classes,
                                         _threshold(y[fit_idx], softmax(logits[fit_idx], t), classes,
                                                    target_sensitivity))})
    report["cross_fitted"] = {k: _mean([f[k] for f in folds]) for k in ("ece_after", "sensitivity", "specificity")}
    return report


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def validation_summary(metrics: dict) -> dict:
    """The compact view of ``classification_metrics`` that goes into meta.json and the model card."""
    keep = ("n", "accuracy", "macro_f1", "macro_auc", "ece", "covid", "per_source", "per_class")
    return {k: metrics[k] for k in keep if k in metrics}


def calibrate_checkpoint(model_uri: str, data_root: str, split: str = "val", target_sensitivity: float = 0.95,
                         limit: int = 0, logits: dict | None = None) -> dict:
    """Fit T and the covid threshold on ``split`` and write them (with the reports) into the checkpoint.

    ``logits``: the checkpoint's :func:`kdray.evaluate.split_logits` on ``split``, if already run."""
    from kdray.checkpoints import META_FILE, resolve_checkpoint
    from kdray.evaluate import split_logits

    if not 0 < target_sensitivity <= 1:
        raise KdrayError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    folder = resolve_checkpoint(model_uri)
    meta_uri = storage.join(folder, META_FILE)
    meta = storage.read_json(meta_uri)
    # the raw model: a previous calibration must not feed into this one
    out = logits or split_logits(folder, data_root, split, backend="torch", limit=limit)
    classes = out["classes"]
    report = calibration_report(out["y"], out["logits"], classes, target_sensitivity)
    report.update({"split": split, "data": data_root})
    metrics = classification_metrics(out["y"], softmax(out["logits"], report["temperature"]), classes,
                                     out["sources"], report["covid_threshold"])
    meta.update({"temperature": report["temperature"], "covid_threshold": report["covid_threshold"],
                 "calibration": report, "validation": {"split": split, **validation_summary(metrics)}})
    storage.write_json(meta_uri, meta)
    log.info("calibrated %s on %s (%d images): T=%.3f, ECE %.4f -> %.4f, covid threshold %s for sensitivity %.2f",
             folder, split, report["n"], report["temperature"], report["ece_before"], report["ece_after"],
             report["covid_threshold"], target_sensitivity)
    return report
