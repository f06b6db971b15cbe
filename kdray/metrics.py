"""Pure metrics for chest X-ray classifiers: numpy, scipy and scikit-learn, nothing else.

Classification metrics, calibration (ECE, temperature scaling), the COVID operating point
(threshold for a target sensitivity, ``covid_suspect``) and the calibration report that
checkpoints and model cards store. No torch, Ray, plotting or I/O: everything here is a
function of arrays, so the unit tests exercise it in milliseconds.

Conventions:
    * ``y_true`` holds integer class indices into ``classes``.
    * ``probs`` is an ``N x C`` array of class probabilities (rows sum to 1).
    * COVID-specific outputs appear only when a class named ``covid``
      (case-insensitive, :func:`covid_index`) is present in ``classes``.
    * Values that are undefined for the given data (e.g. recall of a class
      with no samples) are reported as ``None`` (JSON ``null``).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import numpy as np

from kdray.schemas import CalibrationReport, ClassificationMetrics

log = logging.getLogger(__name__)
COVID_CLASS = "covid"


# --------------------------------------------------------------------------- #
# small internals
# --------------------------------------------------------------------------- #
def covid_index(classes: Sequence[str]) -> int | None:
    """Index of the class named ``covid`` (case-insensitive), or None. Every module finds it this way."""
    for i, name in enumerate(classes):
        if str(name).strip().lower() == COVID_CLASS:
            return i
    return None


def _num(x: Any) -> float | None:
    """Python float, or None for None/NaN/inf (JSON-safe)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _ratio(num: int, den: int) -> float | None:
    return float(num) / float(den) if den > 0 else None


def check_predictions(y_true: Any, probs: Any, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(y_true, probs)``; raise ValueError on misuse."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N x C), got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must be 1-D with length {p.shape[0]}, got shape {y.shape}")
    if p.shape[0] == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    if classes is not None and len(classes) != p.shape[1]:
        raise ValueError(f"{len(classes)} class names given but probs has {p.shape[1]} columns")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must contain integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {p.shape[1] - 1}]")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    return y, p


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro F1 over the classes that occur in ``y`` or ``pred``.

    Classes that neither occur nor are predicted have an undefined F1 and are
    left out rather than counted as 0.
    """
    from sklearn.metrics import f1_score

    labels = np.union1d(y, pred)
    return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))


# --------------------------------------------------------------------------- #
# probabilities & calibration
# --------------------------------------------------------------------------- #
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` over the last axis."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence.

    Confidences are split into ``n_bins`` equal-width bins over (0, 1]
    (bin ``b`` holds ``(b/n, (b+1)/n]``); ECE is the sample-weighted mean of
    ``|accuracy(bin) - mean confidence(bin)|``.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y, p = check_predictions(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    # sum_b |B_b|/N * |acc_b - conf_b|  ==  sum_b |acc_sum_b - conf_sum_b| / N
    return float(np.sum(np.abs(acc_sum - conf_sum)) / counts.sum())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Fit a temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)``.

    The search is over ``log T`` in ``[-5, 5]`` (T in ~[0.0067, 148]) with
    scipy's bounded Brent method; the result is returned as a float.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z = np.asarray(logits, dtype=np.float64)
    y, _ = check_predictions(y_true, z)
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-np.mean(log_softmax(z / math.exp(log_t), axis=1)[rows, y]))

    res = minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(res.x))


# --------------------------------------------------------------------------- #
# COVID operating point
# --------------------------------------------------------------------------- #
def covid_threshold_for_sensitivity(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    target_sensitivity: float = 0.95,
) -> float:
    """Largest threshold ``t`` on P(covid) such that the rule ``P(covid) >= t``
    reaches ``target_sensitivity`` on the given data.

    Raises ValueError if there is no ``covid`` class or no covid positives.
    """
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    ci = covid_index(classes)
    if ci is None:
        raise ValueError(f"no class named '{COVID_CLASS}' in classes {list(classes)}")
    y, p = check_predictions(y_true, probs, classes)
    positives = y == ci
    if not positives.any():
        raise ValueError("cannot choose a covid threshold: y_true contains no covid samples")
    with warnings.catch_warnings():  # no negatives -> FPR undefined; TPR is all we need
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        _, tpr, thresholds = roc_curve(positives, p[:, ci], drop_intermediate=False)
    # thresholds decrease and tpr increases along the curve: take the first hit
    idx = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    return float(thresholds[idx])


def _covid_metrics(y: np.ndarray, p: np.ndarray, ci: int, threshold: float | None) -> dict:
    """Sensitivity / specificity / PPV of the binary covid-vs-rest decision."""
    from sklearn.metrics import confusion_matrix

    actual = y == ci
    decided = p.argmax(axis=1) == ci if threshold is None else p[:, ci] >= threshold
    tn, fp, fn, tp = confusion_matrix(actual, decided, labels=[False, True]).ravel()
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "threshold": _num(threshold),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


# --------------------------------------------------------------------------- #
# main entry point
# --------------------------------------------------------------------------- #
def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    sources: list[str] | None = None,
    covid_threshold: float | None = None,
) -> ClassificationMetrics:
    """Accuracy, macro-F1, per class scores, the confusion matrix, one-vs-rest AUCs and ECE; the covid
    decision (argmax == covid, or P(covid) >= ``covid_threshold`` when given) when a covid class exists; per
    source scores when ``sources`` is given."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    classes = [str(c) for c in classes]
    y, p = check_predictions(y_true, probs, classes)
    n_classes = len(classes)
    labels = np.arange(n_classes)
    pred = p.argmax(axis=1)

    cm = confusion_matrix(y, pred, labels=labels)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    prec, rec, f1, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {
        name: {
            "precision": float(prec[k]) if predicted[k] > 0 else None,
            "recall": float(rec[k]) if support[k] > 0 else None,
            "f1": float(f1[k]) if support[k] + predicted[k] > 0 else None,
            "support": int(support[k]),
        }
        for k, name in enumerate(classes)
    }

    auc: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        pos = y == k
        auc[name] = float(roc_auc_score(pos, p[:, k])) if 0 < pos.sum() < len(y) else None
    defined_auc = [v for v in auc.values() if v is not None]

    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": macro_f1(y, pred),
        "per_class": per_class,
        "classes": classes,
        "confusion_matrix": cm.astype(int).tolist(),
        "roc_auc_ovr": auc,
        "macro_auc": float(np.mean(defined_auc)) if defined_auc else None,
        "ece": expected_calibration_error(p, y),
    }

    ci = covid_index(classes)
    if ci is not None:
        out["covid"] = _covid_metrics(y, p, ci, covid_threshold)

    if sources is not None:
        src = np.asarray([str(s) for s in sources])
        if src.shape[0] != len(y):
            raise ValueError(f"sources has length {src.shape[0]}, expected {len(y)}")
        out["per_source"] = {}
        for s in sorted(set(src.tolist())):
            m = src == s
            out["per_source"][s] = {
                "n": int(m.sum()),
                "accuracy": float(accuracy_score(y[m], pred[m])),
                "macro_f1": macro_f1(y[m], pred[m]),
            }
    return ClassificationMetrics.model_validate(out)


def covid_suspect(probs: np.ndarray, classes: Sequence[str], threshold: float | None) -> np.ndarray | None:
    """Per row: P(covid) >= ``threshold``; None when there is no covid class or no threshold."""
    ci = covid_index(classes)
    if ci is None or threshold is None:
        return None
    return np.asarray(probs)[:, ci] >= float(threshold)


# --------------------------------------------------------------------------- #
# calibration report (temperature + covid threshold, in-sample and cross-fitted)
# --------------------------------------------------------------------------- #
def _threshold(y: np.ndarray, probs: np.ndarray, classes: list[str], target: float) -> float | None:
    try:
        return covid_threshold_for_sensitivity(y, probs, classes, target)
    except ValueError as exc:  # no covid class, or no covid images in this split
        log.warning("no covid threshold: %s", exc)
        return None


def _covid_rates(y: np.ndarray, probs: np.ndarray, classes: list[str], threshold: float | None) -> dict:
    covid = classification_metrics(y, probs, classes, covid_threshold=threshold).covid
    return {"sensitivity": covid.sensitivity if covid else None, "specificity": covid.specificity if covid else None}


def calibration_report(y: np.ndarray, logits: np.ndarray, classes: list[str], target_sensitivity: float = 0.95,
                       seed: int = 0) -> CalibrationReport:
    """Temperature, covid threshold and ECE before/after, in-sample and 2-fold cross-fitted."""
    from sklearn.model_selection import StratifiedKFold

    y, logits = np.asarray(y, dtype=np.int64), np.asarray(logits, dtype=np.float64)
    temperature = fit_temperature(logits, y)
    calibrated = softmax(logits, temperature)
    threshold = _threshold(y, calibrated, classes, target_sensitivity)
    folds = []
    if np.bincount(y).min(initial=len(y)) >= 2:
        for fit_idx, test_idx in StratifiedKFold(2, shuffle=True, random_state=seed).split(logits, y):
            t = fit_temperature(logits[fit_idx], y[fit_idx])
            held_out = softmax(logits[test_idx], t)
            folds.append({"ece_after": expected_calibration_error(held_out, y[test_idx]),
                          **_covid_rates(y[test_idx], held_out, classes,
                                         _threshold(y[fit_idx], softmax(logits[fit_idx], t), classes,
                                                    target_sensitivity))})
    return CalibrationReport(
        temperature=temperature, covid_threshold=threshold, target_sensitivity=target_sensitivity, n=int(len(y)),
        ece_before=expected_calibration_error(softmax(logits), y), ece_after=expected_calibration_error(calibrated, y),
        covid_at_threshold=_covid_rates(y, calibrated, classes, threshold),
        cross_fitted={k: _mean([f[k] for f in folds]) for k in ("ece_after", "sensitivity", "specificity")})


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def validation_summary(metrics: ClassificationMetrics) -> dict:
    """The compact view of ``classification_metrics`` that goes into meta.json and the model card."""
    keep = ("n", "accuracy", "macro_f1", "macro_auc", "ece", "covid", "per_source", "per_class")
    return {k: v for k, v in metrics.model_dump(mode="json", include=set(keep)).items()
            if v is not None or k not in ("covid", "per_source")}
