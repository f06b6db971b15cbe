"""The ``kdray`` command and the shared wrapper that gives every job one-line errors and logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from kdray import KdrayError

log = logging.getLogger("kdray")


def setup_logging() -> None:
    level = os.environ.get("KDRAY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "filelock", "urllib3", "botocore", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))


def run_job(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a job's main; user errors print one line (``error: ...``) and exit 2, with no traceback."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if main.__module__ != __name__:
        _print_doc_on_help(main.__module__, argv)
    try:
        main(argv)
    except KdrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _make_data(argv: list[str]) -> None:
    from kdray.synthetic import make_dataset

    p = argparse.ArgumentParser(prog="kdray make-data", description="Write a synthetic 3-class chest-X-ray-like "
                                "ImageFolder set (train/ and val/) to a folder or s3:// prefix.")
    p.add_argument("output", help="folder or s3://bucket/prefix")
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = make_dataset(a.output, {"train": a.train_per_class, "val": a.val_per_class}, a.size, a.seed)
    print(f"wrote {sum(counts.values())} images to {a.output}")


def _print_doc_on_help(module: str, argv: list[str]) -> None:
    """With --help, a job first prints its module docstring (its usage); the options follow from load_config."""
    doc = getattr(sys.modules.get(module), "__doc__", None)
    if doc and any(arg in ("-h", "--help") for arg in argv):
        print(doc.strip() + "\n")


def _job(module: str) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        import importlib

        job = importlib.import_module(f"jobs.{module}")
        _print_doc_on_help(job.__name__, argv)
        job.main(argv)

    return run


COMMANDS = {
    "make-data": (_make_data, "write the synthetic demo/test data set"),
    "train-teacher": (_job("train_teacher"), "train the ResNet50V2+VGG19 teacher (Ray Train)"),
    "build-cache": (_job("build_cache"), "cache the teacher's logits as Parquet (Ray Data)"),
    "train-student": (_job("train_student"), "distil the MobileNetV2 student from cached logits (Ray Train)"),
    "calibrate": (_job("calibrate"), "fit temperature scaling and the covid threshold on val, store them"),
    "evaluate": (_job("evaluate"), "metrics.json + plots for a checkpoint on a split"),
    "export": (_job("export"), "export a student to ONNX fp32/int8 with parity checks"),
    "score": (_job("score"), "score an image archive offline (Ray Data)"),
    "predict": (_job("predict"), "classify image files with an exported student, without Ray"),
    "pipeline": (_job("pipeline"), "run the whole pipeline end to end"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: kdray COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<14} {text}")
        print("\nJob commands take --config FILE.yaml and --key value overrides; see README.md.")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    run_job(COMMANDS[argv[0]][0], argv[1:])


if __name__ == "__main__":
    main()
