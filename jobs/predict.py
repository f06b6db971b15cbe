"""Classify image files with an exported student, without Ray.

    kdray predict IMAGE [IMAGE ...] --model EXPORT_DIR [--backend auto|onnx-int8|onnx-fp32|torch]

Prints one line per image: ``path<TAB>label<TAB>p(class)=...`` (plus ``covid_suspect`` when the
model card stores a COVID threshold and P(covid) reaches it). Images that cannot be read or
decoded get one ``error: <path>: ...`` line each on stderr, after the good ones, and the
command exits 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from kdray import KdrayError
from kdray.config import PredictJobConfig, load_config
from kdray.runner import run_job
from kdray.images import DEFAULT_LIMITS, ImageRefused, load_image
from kdray.inputs import failure_message, read_failure_reason, read_named
from kdray.predictor import load_predictor

BATCH = 32


@dataclass(frozen=True)
class FilePrediction:
    """One classified file: the predicted label, the calibrated probabilities and the covid_suspect flag."""

    path: str
    label: str
    probs: list[float]
    covid_suspect: bool


def load_for_prediction(path: str, size: int) -> np.ndarray:
    """The decoded image at ``path``, or a KdrayError naming the path and the reason code. The file is read as
    scoring reads it (:func:`kdray.inputs.read_named`: a FIFO or device is refused unopened, never more than
    the byte limit is read) and decoded under :data:`kdray.images.DEFAULT_LIMITS`."""
    try:
        data = read_named(path, DEFAULT_LIMITS)
        return load_image(data, size, DEFAULT_LIMITS).pixels
    except (ImageRefused, OSError, KdrayError) as exc:
        raise KdrayError(f"{path}: cannot decode image ({read_failure_reason(exc)}: {failure_message(exc)})") \
            from None


def load_all(paths: list[str], size: int) -> tuple[list[str], list[np.ndarray], list[str]]:
    """(paths that loaded, their images, one error line per path that did not)."""
    good, images, errors = [], [], []
    for path in paths:
        try:
            images.append(load_for_prediction(path, size))
            good.append(path)
        except KdrayError as exc:
            errors.append(str(exc))
    return good, images, errors


def main(argv: list[str]) -> list[FilePrediction]:
    cfg = load_config(PredictJobConfig, argv)
    predictor = load_predictor(cfg.model, backend=cfg.backend, threads=cfg.threads)
    good, images, errors = load_all(cfg.images, predictor.image_size)

    results = []
    for start in range(0, len(images), BATCH):
        probs = predictor.probabilities(np.stack(images[start:start + BATCH]))
        for path, row in zip(good[start:start + BATCH], probs):
            fields = [path, predictor.classes[int(row.argmax())]]
            fields += [f"p({c})={p:.4f}" for c, p in zip(predictor.classes, row)]
            flags = predictor.covid_suspect(row[None])
            suspect = bool(flags[0]) if flags is not None else False
            if suspect:
                fields.append("covid_suspect")
            print("\t".join(fields), flush=True)
            results.append(FilePrediction(path, fields[1], row.tolist(), suspect))
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    if errors:
        sys.exit(2)
    return results


if __name__ == "__main__":
    run_job(main)
