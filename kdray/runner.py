"""The wrapper every job runs under: logging set up once, user errors as one line and exit code 2."""

from __future__ import annotations

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


def _print_doc_on_help(module: str, argv: list[str]) -> None:
    """With --help, a job first prints its module docstring (its usage); the options follow from load_config."""
    doc = getattr(sys.modules.get(module), "__doc__", None)
    if doc and any(arg in ("-h", "--help") for arg in argv):
        print(doc.strip() + "\n")
