"""Evaluation helpers for chest X-ray classifiers.

Pure functions over numpy arrays: classification metrics (via scikit-learn),
calibration (ECE, temperature scaling), COVID operating-point selection,
PNG plots (matplotlib, Agg canvas) and a small Markdown table formatter.

Conventions:
    * ``y_true`` holds integer class indices into ``classes``.
    * ``probs`` is an ``N x C`` array of class probabilities (rows sum to 1).
    * COVID-specific outputs appear only when a class named ``covid``
      (case-insensitive) is present in ``classes``.
    * Values that are undefined for the given data (e.g. recall of a class
      with no samples) are reported as ``None`` (JSON ``null``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "classification_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "softmax",
    "covid_threshold_for_sensitivity",
    "plot_confusion_matrix",
    "plot_roc",
    "format_table",
    "COVID_CLASS",
]

COVID_CLASS = "covid"
PREDICTIONS_FILE = "predictions.parquet"


# --------------------------------------------------------------------------- #
# small internals
# --------------------------------------------------------------------------- #
def _covid_index(classes: Sequence[str]) -> int | None:
    """Index of the class named ``covid`` (case-insensitive), or None."""
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


def _check_inputs(y_true: Any, probs: Any, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
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


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Macro F1 over the classes that occur in ``y`` or ``pred``.

    Classes that neither occur nor are predicted have an undefined F1 and are
    left out rather than counted as 0.
    """
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
    y, p = _check_inputs(y_true, probs)
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
    z = np.asarray(logits, dtype=np.float64)
    y, _ = _check_inputs(y_true, z)
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
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    ci = _covid_index(classes)
    if ci is None:
        raise ValueError(f"no class named '{COVID_CLASS}' in classes {list(classes)}")
    y, p = _check_inputs(y_true, probs, classes)
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
) -> dict:
    """Compute a JSON-serialisable metrics report.

    Keys: ``n``, ``accuracy``, ``macro_f1`` (over classes present in the labels
    or predictions), ``per_class`` {class: precision, recall, f1, support},
    ``confusion_matrix`` (rows = true, cols = predicted) and ``classes``,
    ``roc_auc_ovr`` {class: one-vs-rest AUC or None if the class is absent or
    is the only class}, ``macro_auc`` (mean of the defined AUCs), ``ece``;
    ``covid`` {sensitivity, specificity, ppv, threshold, tp, fp, tn, fn} when a
    covid class exists (decision: argmax == covid, or P(covid) >=
    ``covid_threshold`` when given); ``per_source`` {source: n, accuracy,
    macro_f1} when ``sources`` is given.
    """
    classes = [str(c) for c in classes]
    y, p = _check_inputs(y_true, probs, classes)
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
        "macro_f1": _macro_f1(y, pred),
        "per_class": per_class,
        "classes": classes,
        "confusion_matrix": cm.astype(int).tolist(),
        "roc_auc_ovr": auc,
        "macro_auc": float(np.mean(defined_auc)) if defined_auc else None,
        "ece": expected_calibration_error(p, y),
    }

    ci = _covid_index(classes)
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
                "macro_f1": _macro_f1(y[m], pred[m]),
            }
    return out


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
def _new_figure(size: tuple[float, float]):
    """A standalone Agg-backed figure (not registered with pyplot: no leaks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    fig.clear()
    return str(path)


def plot_confusion_matrix(cm: Any, classes: Sequence[str], path: str | Path, title: str | None = None) -> str:
    """Write a confusion-matrix heatmap PNG (rows = true, cols = predicted); returns the path."""
    cm = np.asarray(cm)
    size = max(4.0, 1.0 + 0.9 * len(classes))
    fig = _new_figure((size + 1.0, size))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay(confusion_matrix=cm, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=True, xticks_rotation=45
    )
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_roc(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | Path, title: str | None = None
) -> str:
    """Write one-vs-rest ROC curves (one per class with both positives and
    negatives) to a PNG; returns the path."""
    y, p = _check_inputs(y_true, probs, classes)
    fig = _new_figure((5.5, 5.0))
    ax = fig.add_subplot()
    for k, name in enumerate(classes):
        pos = y == k
        if not 0 < pos.sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(pos, p[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC = {roc_auc_score(pos, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="False positive rate", ylabel="True positive rate")
    ax.set_title(title or "ROC (one-vs-rest)")
    ax.legend(loc="lower right")
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# printing
# --------------------------------------------------------------------------- #
def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, numbers.Integral):  # includes bool and numpy ints
        return str(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            return "–"
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Render ``rows`` as a Markdown table with the given ``columns``.

    Floats get 4 decimals, None/NaN/missing keys become "–", and ``|`` in
    text is escaped.
    """
    lines = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# evaluating a model on a split (Ray Data)
# --------------------------------------------------------------------------- #
def model_card(model_uri: str) -> dict:
    """classes, image_size, temperature and covid_threshold of a checkpoint or an exported model."""
    from kdray import storage
    from kdray.checkpoints import read_meta
    from kdray.runtime import METADATA_FILE

    exported = storage.join(model_uri, METADATA_FILE)
    return storage.read_json(exported) if storage.exists(exported) else read_meta(model_uri)


def split_logits(model_uri: str, data_root: str, split: str, backend: str = "auto", batch_size: int = 64,
                 limit: int = 0) -> dict:
    """Run a model over a split with a Ray Data actor pool: labels, logits, sources and timings."""
    import time

    from kdray.data import list_split, load_split
    from kdray.raycluster import init_ray
    from kdray.runtime import run_logits

    init_ray()
    card = model_card(model_uri)
    classes, size = card["classes"], int(card["image_size"])
    listing = list_split(data_root, split, classes, limit)
    started = time.time()
    ds, skipped = load_split(listing, size)
    table = run_logits(ds, model_uri, views=1, batch_size=batch_size, backend=backend)
    return {"card": card, "classes": classes, "image_size": size, "skipped": skipped,
            "seconds": time.time() - started, "y": np.asarray(table["label"].to_numpy()),
            "logits": np.stack(table["logits"].to_numpy(zero_copy_only=False)).astype(np.float64),
            "sources": table["source"].to_pylist() if "source" in table.column_names else None,
            "image_ids": table["image_id"].to_pylist()}


def predictions_table(image_ids: list[str], y: np.ndarray, probs: np.ndarray, classes: list[str],
                      sources: list[str] | None = None):
    """One row per image: image_id, label, prediction and p_<class> (and source): for error analysis and
    for paired comparisons between models scored on the same images (:mod:`kdray.uncertainty`)."""
    import pyarrow as pa

    names = np.asarray(classes, dtype=object)
    columns = {"image_id": pa.array(image_ids, pa.string()), "label": pa.array(names[np.asarray(y)].tolist()),
               "prediction": pa.array(names[probs.argmax(axis=1)].tolist()),
               **{f"p_{c}": pa.array(probs[:, i], pa.float64()) for i, c in enumerate(classes)}}
    if sources is not None:
        columns["source"] = pa.array(sources, pa.string())
    return pa.table(columns)


def evaluate_model(model_uri: str, data_root: str, split: str, output: str, backend: str = "auto",
                   batch_size: int = 64, name: str = "", limit: int = 0, logits: dict | None = None) -> dict:
    """Metrics of a model on a split (with its stored temperature and covid threshold); writes metrics.json,
    predictions.parquet (:func:`predictions_table`, calibrated probabilities), confusion.png and roc.png.
    ``logits``: this model's :func:`split_logits` on ``split``, if already run."""
    import tempfile

    from kdray import storage

    out = logits or split_logits(model_uri, data_root, split, backend, batch_size, limit)
    card, classes, y = out["card"], out["classes"], out["y"]
    probs = softmax(out["logits"], float(card.get("temperature") or 1.0))
    metrics = classification_metrics(y, probs, classes, out["sources"], card.get("covid_threshold"))
    metrics.update({"model": model_uri, "name": name or model_uri, "data": data_root, "split": split,
                    "image_size": out["image_size"], "skipped_images": out["skipped"],
                    "eval_s": round(out["seconds"], 1), "eval_img_per_s": round(len(y) / max(out["seconds"], 1e-9), 2),
                    "temperature": float(card.get("temperature") or 1.0),
                    "ece_uncalibrated": expected_calibration_error(softmax(out["logits"]), y),
                    "calibration": card.get("calibration")})
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{name or 'model'} — {split}"
        for fname, draw in (("confusion.png", lambda p: plot_confusion_matrix(metrics["confusion_matrix"], classes,
                                                                              p, title)),
                            ("roc.png", lambda p: plot_roc(y, probs, classes, p, title))):
            local = str(Path(tmp) / fname)
            draw(local)
            storage.write_bytes(storage.join(output, fname), Path(local).read_bytes())
    storage.write_parquet(storage.join(output, PREDICTIONS_FILE),
                          predictions_table(out["image_ids"], y, probs, classes, out["sources"]))
    storage.write_json(storage.join(output, "metrics.json"), metrics)
    return metrics
