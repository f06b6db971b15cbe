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

from dataclasses import dataclass
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
ECE_BINS = 15  # kdray.metrics.expected_calibration_error's default


def _resampled(metric: str, y: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``metric`` of many resamples at once: index rows ``[R, n]`` → ``[R]`` values, by the same definitions as
    :data:`METRICS` (macro-F1 over the classes a resample holds or predicts; ECE over the same equal-width
    bins), computed from per-image arrays instead of a metrics call per resample."""
    pred = probs.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    if metric == "accuracy":
        return lambda idx: correct[idx].mean(axis=-1)
    if metric == "macro_f1":
        def f1(idx: np.ndarray) -> np.ndarray:
            truth, guess = y[idx], pred[idx]
            scores, present = np.zeros(idx.shape[0]), np.zeros(idx.shape[0])
            for c in range(probs.shape[1]):
                tp = ((truth == c) & (guess == c)).sum(axis=-1)
                spread = (truth == c).sum(axis=-1) + (guess == c).sum(axis=-1)  # 2·tp + fp + fn
                scores += np.where(spread > 0, 2 * tp / np.maximum(spread, 1), 0.0)
                present += spread > 0
            return scores / present
        return f1
    conf = probs.max(axis=1)
    bins = np.clip(np.ceil(conf * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
    gap = correct - conf  # per image: what it adds to its bin's |accuracy sum - confidence sum|

    def ece(idx: np.ndarray) -> np.ndarray:
        in_bins, gaps = bins[idx], gap[idx]
        return sum(np.abs((gaps * (in_bins == b)).sum(axis=-1)) for b in range(ECE_BINS)) / idx.shape[-1]
    return ece


def _bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, seed: int, resamples: int):
    """scipy's percentile bootstrap over n images; ``statistic`` maps index rows [R, n] to [R] values."""
    from scipy.stats import bootstrap

    return bootstrap((np.arange(n),), lambda idx, axis=-1: statistic(np.atleast_2d(idx)).reshape(np.shape(idx)[:-1]),
                     n_resamples=resamples, confidence_level=CONFIDENCE, method="percentile", vectorized=True,
                     batch=max(1, 2**22 // max(n, 1)), random_state=np.random.default_rng(seed))


def _check(y, *probs: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64)
    if len(y) < 2:
        raise KdrayError(f"a bootstrap interval needs at least 2 images, got {len(y)}")
    for p in probs:
        if p.ndim != 2 or p.shape[0] != len(y):
            raise KdrayError(f"probabilities of shape {p.shape} do not match {len(y)} labels")
    return y


@dataclass(frozen=True)
class Interval:
    """A metric's value with its 95% percentile-bootstrap interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedDifference:
    """metric(A) - metric(B) on the same images, its paired 95% interval, and the share of resamples in which
    A was better."""

    metric: str
    difference: float
    low: float
    high: float
    share_a_better: float


def metric_intervals(y: np.ndarray, probs: np.ndarray, seed: int = 0,
                     resamples: int = RESAMPLES) -> dict[str, Interval]:
    """Accuracy, macro-F1 and ECE (by name, as in :data:`METRICS`) with their intervals, resampling the images."""
    y = _check(y, probs)
    out = {}
    for name, metric in METRICS.items():
        ci = _bootstrap(_resampled(name, y, probs), len(y), seed, resamples).confidence_interval
        out[name] = Interval(metric(y, probs), float(ci.low), float(ci.high))
    return out


def paired_difference(y: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, metric: str = "macro_f1",
                      seed: int = 0, resamples: int = RESAMPLES) -> PairedDifference:
    """metric(A) - metric(B) on the same images (:class:`PairedDifference`)."""
    if metric not in METRICS:
        raise KdrayError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    y = _check(y, probs_a, probs_b)
    of_a, of_b = _resampled(metric, y, probs_a), _resampled(metric, y, probs_b)
    result = _bootstrap(lambda idx: of_a(idx) - of_b(idx), len(y), seed, resamples)
    fn = METRICS[metric]
    return PairedDifference(metric, fn(y, probs_a) - fn(y, probs_b), float(result.confidence_interval.low),
                            float(result.confidence_interval.high), float(np.mean(result.bootstrap_distribution > 0)))


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
