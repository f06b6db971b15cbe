"""How precise a number measured on a few hundred images is: bootstrap intervals over the images.

Val holds 399 images, so one image moves accuracy by a quarter of a point, and two models a point
apart may not differ at all. These helpers resample the images with replacement
(``scipy.stats.bootstrap``, percentile method) and report 95% intervals:

- :func:`metric_intervals`: accuracy, macro-F1 and ECE of one model;
- :func:`paired_difference`: a metric of model A minus model B, both scored on the *same*
  resampled images (paired), which is much tighter than comparing two separate intervals.

They measure sampling noise only. When val also chose the checkpoint, the KD setting, the
temperature and the threshold, the point estimates are optimistic as well, and no interval
computed on val can show by how much.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from kdray import KdrayError
from kdray.metrics import expected_calibration_error, macro_f1

CONFIDENCE = 0.95
RESAMPLES = 2000


def _accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == y))


def _macro_f1_of_probs(y: np.ndarray, probs: np.ndarray) -> float:
    return macro_f1(y, probs.argmax(axis=1))  # the definition the metrics tables use


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy, "macro_f1": _macro_f1_of_probs, "ece": lambda y, p: expected_calibration_error(p, y)}


def _bootstrap(statistic: Callable[[np.ndarray], float], n: int, seed: int, resamples: int):
    """scipy's percentile bootstrap of ``statistic(image indices)`` over n images."""
    from scipy.stats import bootstrap

    return bootstrap((np.arange(n),), statistic, n_resamples=resamples, confidence_level=CONFIDENCE,
                     method="percentile", vectorized=False, random_state=np.random.default_rng(seed))


def _check(y, *probs: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2:
        raise KdrayError(f"a bootstrap interval needs at least 2 images, got {len(y)}")
    for p in probs:
        if p.ndim != 2 or p.shape[0] != len(y):
            raise KdrayError(f"probabilities of shape {p.shape} do not match {len(y)} labels")
    return y


def metric_intervals(y: np.ndarray, probs: np.ndarray, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, dict]:
    """{metric: {"value", "low", "high"}} for accuracy, macro-F1 and ECE, resampling the images."""
    y = _check(y, probs)
    out = {}
    for name, metric in METRICS.items():
        ci = _bootstrap(lambda idx: metric(y[idx], probs[idx]), len(y), seed, resamples).confidence_interval
        out[name] = {"value": metric(y, probs), "low": float(ci.low), "high": float(ci.high)}
    return out


def paired_difference(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric: str = "macro_f1",
                      seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """metric(A) - metric(B) on the same images, with its paired 95% interval and the share of resamples
    in which A was better."""
    if metric not in METRICS:
        raise KdrayError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    y = _check(y, probs_a, probs_b)
    fn = METRICS[metric]

    def difference(idx: np.ndarray) -> float:
        return fn(y[idx], probs_a[idx]) - fn(y[idx], probs_b[idx])

    result = _bootstrap(difference, len(y), seed, resamples)
    return {"metric": metric, "difference": difference(np.arange(len(y))), "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high),
            "share_a_better": float(np.mean(result.bootstrap_distribution > 0))}


def aligned(tables: dict[str, pa.Table]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and per-model probabilities on the images every model scored, in one order.

    ``tables``: name → predictions table (:func:`kdray.evaluate.predictions_table`); the class order is
    that of the first table's ``p_<class>`` columns."""
    frames = {name: t.to_pydict() for name, t in tables.items()}
    classes = [c[2:] for c in next(iter(frames.values())) if c.startswith("p_")]
    common = sorted(set.intersection(*(set(f["image_id"]) for f in frames.values())))
    if not common:
        raise KdrayError("the models' predictions share no image")
    index = {c: i for i, c in enumerate(classes)}
    y, probs = None, {}
    for name, f in frames.items():
        if [c[2:] for c in f if c.startswith("p_")] != classes:
            raise KdrayError(f"{name}: its classes differ from the other models'")
        row = {image_id: i for i, image_id in enumerate(f["image_id"])}
        order = [row[image_id] for image_id in common]
        labels = np.array([index[f["label"][i]] for i in order], dtype=np.int64)
        if y is not None and not np.array_equal(labels, y):
            raise KdrayError(f"{name}: its labels differ from the other models' on the same images")
        y = labels
        probs[name] = np.stack([np.asarray(f[f"p_{c}"], dtype=np.float64)[order] for c in classes], axis=1)
    return y, probs
