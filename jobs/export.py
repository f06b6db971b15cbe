"""Export a trained student to ONNX fp32 + static int8 (and optionally TorchScript), validate it, and fit
the served operating point.

    python -m jobs.export --model CKPT_OR_RUN --data ROOT --output URI \
        [--calibration 128] [--parity 0] [--int8 true] [--torchscript false] [--strict true]

Calibration images for int8 come from the train split. Parity and the operating point use the
labelled val split (all of it by default): every artifact must agree with the torch model on
top-1, then each ONNX artifact gets its own temperature and covid threshold fitted on its own
logits, and its covid_suspect must agree with torch at that threshold. int8 is served if it
passes, else fp32. The export folder gets the artifacts, ``args.yaml`` (this job's resolved
config) and, last, ``metadata.json`` (the model card and commit marker). The job prints the pinned
reference ``<output>@sha256:<digest of metadata.json>``: serving, scoring, ``kdray predict`` and ``kdray explain``
given it load exactly this export or refuse (``model_digest_mismatch``). An artifact below a bar
makes the job fail (exit 2) after printing the parity table; with ``--strict false`` a failing
int8 or TorchScript artifact is only marked ``validated: false`` and the job succeeds with fp32.
"""

from __future__ import annotations

import numpy as np

from kdray import storage
from kdray.checkpoints import read_checkpoint_meta
from kdray.runner import run_job
from kdray.config import ExportJobConfig, dump_yaml, load_config
from kdray.data import sample_images
from kdray.evaluate import format_table
from kdray.export import ParityError, export_student, pinned_reference
from kdray.schemas import ModelCard


def main(argv: list[str]) -> ModelCard:
    cfg = load_config(ExportJobConfig, argv)
    meta = read_checkpoint_meta(cfg.model)
    size, classes = meta.image_size, meta.classes

    calibration = np.zeros((0, size, size), np.uint8)
    if cfg.int8:
        calibration, _ = sample_images(cfg.data, cfg.train_split, size, cfg.calibration, classes)
    val_images, val_labels = sample_images(cfg.data, cfg.val_split, size, cfg.parity, classes)

    storage.makedirs(cfg.output)
    storage.write_text(storage.join(cfg.output, "args.yaml"), dump_yaml(cfg))
    extra = {k: v for k, v in (("name", cfg.name), ("version", cfg.version)) if v}
    try:
        card = export_student(cfg.model, cfg.output, calibration, val_images, val_labels, int8=cfg.int8,
                              torchscript=cfg.torchscript, extra_metadata=extra, strict=cfg.strict,
                              target_sensitivity=cfg.target_sensitivity, split=cfg.val_split)
    except ParityError as exc:
        if exc.metadata:  # committed, with the failing artifact marked validated=false
            print_summary(exc.metadata, cfg.output)
        raise
    print_summary(card, cfg.output)
    print(f"exported {cfg.model} -> {cfg.output}")
    return card


def print_summary(card: ModelCard, output: str) -> None:
    """The parity table, the served artifact's operating point, then the export's pinned reference."""
    rows = []
    for kind, artifact in card.artifacts.items():
        parity, op = card.parity[kind], card.operating_point(kind)
        rows.append({"artifact": kind, "size MB": artifact.size_mb, "top-1 agreement": parity.top1_agreement,
                     "covid_suspect agreement": parity.covid_suspect_agreement, "max |Δp|": parity.max_abs_prob_diff,
                     "accuracy": parity.accuracy, "T": op.temperature if op else None,
                     "covid threshold": op.covid_threshold if op else None, "validated": str(artifact.validated)})
    reference = card.parity_reference or {}
    print(f"parity against the fp32 torch model on {reference.get('n')} {reference.get('split')} images "
          f"(torch accuracy {reference.get('accuracy', float('nan')):.4f}); bars {card.parity_bars}:")
    print(format_table(rows, list(rows[0])))
    op = card.operating_points[card.served_artifact]
    print(f"served: {card.served_artifact}, temperature {op.temperature:.3f} (ECE {op.ece_before:.4f} -> "
          f"{op.ece_after:.4f}), covid threshold {op.covid_threshold} for sensitivity {op.target_sensitivity:.0%} "
          f"on {op.split}")
    print(f"pinned: {pinned_reference(output, card)}")


if __name__ == "__main__":
    run_job(main)
