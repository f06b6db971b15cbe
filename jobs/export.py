"""Export a trained student to ONNX fp32 + static int8 (and optionally TorchScript), with parity checks.

    python -m jobs.export --model CKPT_OR_RUN --data ROOT --output URI \
        [--calibration 128] [--parity 256] [--int8 true] [--torchscript false] [--strict true]

Calibration images come from the train split, parity images from the val split. The export
folder gets the artifacts, ``args.yaml`` (this job's resolved config) and, last,
``metadata.json`` (the model card and commit marker). An artifact below its parity bar makes the
job fail (exit 2) after printing the parity table; with ``--strict false`` a failing int8 or
TorchScript artifact is only marked ``validated: false`` and the job succeeds with fp32.
"""

from __future__ import annotations

import numpy as np

from kdray import KdrayError, storage
from kdray.checkpoints import read_meta
from kdray.cli import run_job
from kdray.config import dump_yaml, load_config
from kdray.data import sample_images
from kdray.evaluate import format_table
from kdray.export import PARITY_BARS, ExportJobConfig, ParityError, export_student


def main(argv: list[str]) -> dict:
    cfg = load_config(ExportJobConfig, argv)
    for key in ("model", "data", "output"):
        if not getattr(cfg, key):
            raise KdrayError(f"--{key} is required")
    meta = read_meta(cfg.model)
    size, classes = int(meta["image_size"]), list(meta["classes"])

    calibration = np.zeros((0, size, size), np.uint8)
    if cfg.int8:
        calibration, _ = sample_images(cfg.data, cfg.train_split, size, cfg.calibration, classes)
    parity, labels = sample_images(cfg.data, cfg.val_split, size, cfg.parity, classes)

    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "args.yaml"), dump_yaml(cfg))
    extra = {k: v for k, v in (("name", cfg.name), ("version", cfg.version)) if v}
    try:
        metadata = export_student(cfg.model, cfg.output, calibration, parity, labels, int8=cfg.int8,
                                  torchscript=cfg.torchscript, extra_metadata=extra, strict=cfg.strict)
    except ParityError as exc:
        if exc.metadata:  # committed, with the failing artifact marked validated=false
            print_summary(exc.metadata, cfg.val_split)
        raise
    print_summary(metadata, cfg.val_split)
    print(f"exported {cfg.model} -> {cfg.output}")
    return metadata


def print_summary(metadata: dict, split: str) -> None:
    rows = [{"artifact": kind, "file": a["file"], "size MB": a["size_mb"],
             "top-1 agreement": metadata["parity"][kind]["top1_agreement"], "bar": PARITY_BARS[kind],
             "max |Δp|": metadata["parity"][kind]["max_abs_prob_diff"],
             "accuracy": metadata["parity"][kind].get("accuracy"), "validated": str(a["validated"])}
            for kind, a in metadata["artifacts"].items()]
    reference = metadata["parity"].get("reference", {}).get("accuracy")
    n = metadata["parity"]["fp32"]["n"]
    print(f"parity against the fp32 torch model on {n} {split} images"
          + (f" (torch accuracy {reference:.4f}):" if reference is not None else ":"))
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    run_job(main)
