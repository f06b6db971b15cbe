"""Export a trained student to ONNX fp32 + static int8 (and optionally TorchScript), with parity checks.

    python -m jobs.export --model CKPT_OR_RUN --data ROOT --output URI \
        [--calibration 128] [--parity 256] [--int8 true] [--torchscript false]

Calibration images come from the train split, parity images from the val split. The export
folder gets the artifacts, ``args.yaml`` (this job's resolved config) and, last,
``metadata.json`` (the model card and commit marker).
"""

from __future__ import annotations

import logging

import numpy as np

from kdray import KdrayError, storage
from kdray.checkpoints import read_meta
from kdray.cli import run_job
from kdray.config import dump_yaml, load_config
from kdray.data import DecodeBatch, Listing, list_split
from kdray.evaluate import format_table
from kdray.export import PARITY_BARS, ExportJobConfig, export_student

log = logging.getLogger("jobs.export")


def read_images(listing: Listing, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a listing without Ray; unreadable files are skipped (and logged)."""
    batch = DecodeBatch(listing.fs, size)({"path": np.array(listing.paths, dtype=object)})
    good = batch["error"] == ""
    if not good.all():
        log.warning("%s/%s: skipped %d unreadable image(s)", listing.root, listing.split, int((~good).sum()))
    return batch["image"][good], np.asarray(listing.labels, dtype=np.int64)[good]


def main(argv: list[str]) -> dict:
    cfg = load_config(ExportJobConfig, argv)
    for key in ("model", "data", "output"):
        if not getattr(cfg, key):
            raise KdrayError(f"--{key} is required")
    meta = read_meta(cfg.model)
    size, classes = int(meta["image_size"]), list(meta["classes"])

    calibration = np.zeros((0, size, size), np.uint8)
    if cfg.int8:
        calibration, _ = read_images(list_split(cfg.data, cfg.train_split, classes, cfg.calibration), size)
    parity, labels = read_images(list_split(cfg.data, cfg.val_split, classes, cfg.parity), size)

    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "args.yaml"), dump_yaml(cfg))
    extra = {k: v for k, v in (("name", cfg.name), ("version", cfg.version)) if v}
    metadata = export_student(cfg.model, cfg.output, calibration, parity, labels, int8=cfg.int8,
                              torchscript=cfg.torchscript, extra_metadata=extra)

    rows = [{"artifact": kind, "file": a["file"], "size MB": a["size_mb"],
             "top-1 agreement": metadata["parity"][kind]["top1_agreement"], "bar": PARITY_BARS[kind],
             "max |Δp|": metadata["parity"][kind]["max_abs_prob_diff"],
             "accuracy": metadata["parity"][kind].get("accuracy"), "validated": str(a["validated"])}
            for kind, a in metadata["artifacts"].items()]
    print(f"parity against the fp32 torch model on {len(parity)} {cfg.val_split} images "
          f"(torch accuracy {metadata['parity']['reference']['accuracy']:.4f}):")
    print(format_table(rows, list(rows[0])))
    print(f"exported {cfg.model} -> {cfg.output}")
    return metadata


if __name__ == "__main__":
    run_job(main)
