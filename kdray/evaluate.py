"""Evaluating a model on a split: run it with Ray Data, compute :mod:`kdray.metrics`, write
metrics.json, predictions.parquet and PNG plots (matplotlib, Agg canvas); plus the Markdown
table formatter the jobs print with.
"""

from __future__ import annotations

import math
import numbers
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, roc_auc_score, roc_curve

from kdray import storage
from kdray.batch import run_logits
from kdray.data import Listing, list_split, load_split
from kdray.metrics import check_predictions, classification_metrics, expected_calibration_error, softmax
from kdray.predictor import ModelInfo, model_info
from kdray.raycluster import init_ray
from kdray.schemas import Evaluation

PREDICTIONS_FILE = "predictions.parquet"


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
    y, p = check_predictions(y_true, probs, classes)
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
@dataclass(frozen=True)
class SplitLogits:
    """A model's logits over one split, with the labels and what is known about each image."""

    info: ModelInfo  # the model's classes, image size, temperature and covid threshold
    data_root: str
    split: str
    y: np.ndarray  # int labels [N]
    logits: np.ndarray  # float64 [N, classes]
    image_ids: list[str]
    sources: list[str] | None
    skipped: list  # {"path", "reason"} of the split's unreadable files
    seconds: float

    @property
    def classes(self) -> list[str]:
        return self.info.classes


def split_logits(model_uri: str, data_root: str, split: str, backend: str = "auto", batch_size: int = 64,
                 limit: int = 0) -> SplitLogits:
    """Run a model over a split (listed and decoded here) with a Ray Data actor pool."""
    init_ray()
    info = model_info(model_uri, backend)
    listing = list_split(data_root, split, info.classes, limit)
    started = time.time()
    ds, skipped = load_split(listing, info.image_size)
    return decoded_logits(model_uri, listing, ds, skipped, backend, batch_size, info, started)


def decoded_logits(model_uri: str, listing: Listing, ds, skipped: list, backend: str = "auto", batch_size: int = 64,
                   info: ModelInfo | None = None, started: float | None = None) -> SplitLogits:
    """Run a model over ``listing`` already decoded (:func:`kdray.data.load_split` at the model's image size)."""
    started = started or time.time()
    info = info or model_info(model_uri, backend)
    table = run_logits(ds, model_uri, views=1, batch_size=batch_size, backend=backend)
    return SplitLogits(info=info, data_root=listing.root, split=listing.split, y=np.asarray(table["label"].to_numpy()),
                       logits=np.stack(table["logits"].to_numpy(zero_copy_only=False)).astype(np.float64),
                       image_ids=table["image_id"].to_pylist(),
                       sources=table["source"].to_pylist() if "source" in table.column_names else None,
                       skipped=skipped, seconds=time.time() - started)


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
                   batch_size: int = 64, name: str = "", limit: int = 0) -> Evaluation:
    """Metrics of a model on a split, listed and decoded here: :func:`evaluate_logits` of :func:`split_logits`."""
    return evaluate_logits(model_uri, split_logits(model_uri, data_root, split, backend, batch_size, limit), output,
                           name)


def evaluate_logits(model_uri: str, out: SplitLogits, output: str, name: str = "") -> Evaluation:
    """Metrics of a model from its logits on a split (with its stored temperature and covid threshold); writes
    metrics.json, predictions.parquet (:func:`predictions_table`, calibrated probabilities), confusion.png and
    roc.png under ``output``. Returns the evaluation as written to metrics.json."""
    info, classes, y, split = out.info, out.classes, out.y, out.split
    probs = softmax(out.logits, info.temperature)
    scores = classification_metrics(y, probs, classes, out.sources, info.covid_threshold)
    metrics = Evaluation(**dict(scores), model=model_uri, name=name or model_uri, data=out.data_root, split=split,
                         image_size=info.image_size, skipped_images=out.skipped, eval_s=round(out.seconds, 1),
                         eval_img_per_s=round(len(y) / max(out.seconds, 1e-9), 2), backend=info.backend,
                         temperature=info.temperature,
                         ece_uncalibrated=expected_calibration_error(softmax(out.logits), y),
                         calibration=info.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{name or 'model'} — {split}"
        for fname, draw in (("confusion.png", lambda p: plot_confusion_matrix(metrics.confusion_matrix, classes,
                                                                              p, title)),
                            ("roc.png", lambda p: plot_roc(y, probs, classes, p, title))):
            local = str(Path(tmp) / fname)
            draw(local)
            storage.write_bytes(storage.join(output, fname), Path(local).read_bytes())
    storage.write_parquet(storage.join(output, PREDICTIONS_FILE),
                          predictions_table(out.image_ids, y, probs, classes, out.sources))
    storage.write_json(storage.join(output, "metrics.json"), metrics.model_dump(mode="json"))
    return metrics
