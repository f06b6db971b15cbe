"""Explain predictions: one Grad-CAM overlay PNG per image, for the class the served model predicts.

    kdray explain IMAGE [IMAGE ...] --model EXPORT_DIR --output DIR [--backend auto|onnx-int8|onnx-fp32|torch]

The label comes from the served artifact (as ``kdray predict``); the heat map from the export's torch
weights (``model.weights.pt``). Prints one line per image: ``path<TAB>label<TAB>overlay path`` (plus
``torch says <class>`` where the torch weights' top class differs). Each overlay is
``DIR/<image name>.png`` (``<image name>-2.png`` and so on when two inputs share a name), and
``DIR/explanations.csv`` lists them all. Unreadable images get one ``error:`` line each and exit code 2.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from dataclasses import dataclass

import numpy as np

from kdray import KdrayError, storage
from kdray.config import ExplainJobConfig, load_config
from kdray.explain import Explainer
from kdray.predictor import load_predictor
from kdray.runner import run_job
from jobs.predict import load_all

BATCH = 8


@dataclass(frozen=True)
class FileExplanation:
    """One explained file: the served label, where its overlay went, and the torch weights' own top class."""

    path: str
    label: str
    overlay: str
    torch_class: str
    p_label: float


def overlay_names(paths: list[str]) -> list[str]:
    """``<name>.png`` per input (its file name without extension), numbered where names repeat."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


def main(argv: list[str]) -> list[FileExplanation]:
    cfg = load_config(ExplainJobConfig, argv)
    predictor = load_predictor(cfg.model, backend=cfg.backend, threads=cfg.threads)
    explainer = Explainer.load(cfg.model, threads=cfg.threads)
    if explainer.classes != predictor.classes:
        raise KdrayError(f"{cfg.model}: the torch weights' classes {explainer.classes} differ from the served "
                         f"model's {predictor.classes}")
    good, images, errors = load_all(cfg.images, predictor.image_size)
    storage.makedirs(cfg.output)
    results, names = [], overlay_names(good)
    for start in range(0, len(images), BATCH):
        batch = np.stack(images[start:start + BATCH])
        probs = predictor.probabilities(batch)
        explanations = explainer.explain(batch, probs.argmax(1))
        chunk = slice(start, start + BATCH)
        for path, row, explanation, file in zip(good[chunk], probs, explanations, names[chunk]):
            overlay = storage.join(cfg.output, file)
            storage.write_bytes(overlay, explanation.overlay_png)
            note = "" if explanation.agrees else f"\ttorch says {explanation.torch_class}"
            print(f"{path}\t{explanation.explained_class}\t{overlay}{note}", flush=True)
            results.append(FileExplanation(path, explanation.explained_class, overlay, explanation.torch_class,
                                           float(row.max())))
    if results:
        storage.write_text(storage.join(cfg.output, "explanations.csv"), _csv(results))
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if errors:
        sys.exit(2)
    return results


def _csv(rows: list[FileExplanation]) -> str:
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[f.name for f in dataclasses.fields(FileExplanation)])
    writer.writeheader()
    writer.writerows(dataclasses.asdict(row) for row in rows)
    return out.getvalue()


if __name__ == "__main__":
    run_job(main)
