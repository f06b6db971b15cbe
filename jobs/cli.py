"""The ``kdray`` command: one subcommand per job (``kdray evaluate ...`` = ``python -m jobs.evaluate ...``)."""

from __future__ import annotations

import importlib
import sys

from kdray.runner import run_job

COMMANDS = {
    "make-data": ("make_data", "write the synthetic demo/test data set"),
    "train-teacher": ("train_teacher", "train the ResNet50V2+VGG19 teacher (Ray Train)"),
    "build-cache": ("build_cache", "cache the teacher's logits as Parquet (Ray Data)"),
    "train-student": ("train_student", "distil the MobileNetV2 student from cached logits (Ray Train)"),
    "calibrate": ("calibrate", "fit temperature scaling and the covid threshold on val, store them"),
    "evaluate": ("evaluate", "metrics.json + plots for a checkpoint on a split"),
    "export": ("export", "export a student to ONNX fp32/int8 with parity checks and its operating point"),
    "score": ("score", "score an image archive offline (Ray Data)"),
    "listen": ("listen", "a DICOM C-STORE node: scores pushed CR/DX images and stores their SRs onward"),
    "predict": ("predict", "classify image files with an exported student, without Ray"),
    "explain": ("explain", "Grad-CAM overlay PNGs of the student's predictions, without Ray"),
    "pipeline": ("pipeline", "run the whole pipeline end to end"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: kdray COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<14} {text}")
        print("\nJob commands take --config FILE.yaml and --key value overrides; see README.md.")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    job = importlib.import_module(f"jobs.{COMMANDS[argv[0]][0]}")
    run_job(job.main, argv[1:])


if __name__ == "__main__":
    main()
