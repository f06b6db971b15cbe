"""The wrapper every job runs under: logging set up once, user errors as one line and exit code 2."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kdray import KdrayError, first_line

log = logging.getLogger("kdray")
VERBOSE_FLAGS = ("--verbose", "-v")
#: Loggers whose INFO records reach the console when quiet: stage headers and progress lines.
CONSOLE_LOGGERS = ("kdray.pipeline", "kdray.progress")
NOISY_LIBRARIES = ("filelock", "urllib3", "botocore", "matplotlib", "PIL", "fsspec", "asyncio")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """Quiet console: warnings and errors from anyone, INFO only from the stage and progress loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":  # library deprecation chatter: the log file has it
            return False
        return record.levelno >= logging.WARNING or record.name.startswith(CONSOLE_LOGGERS)


@dataclass(frozen=True)
class LogSettings:
    """How this process's logging was set up: Ray's setup follows it (``kdray.raycluster.init_ray`` reroutes worker
    output to the log file unless verbose). The default, for a process that never called :func:`setup_logging`
    (a test, a notebook), is quiet with no file of kdray's own."""

    verbose: bool = False
    log_file: str | None = None


_LOG_SETTINGS = LogSettings()


def log_settings() -> LogSettings:
    """What the last :func:`setup_logging` of this process chose."""
    return _LOG_SETTINGS


#: Set by Ray in the environment of a submitted job's driver (ray.dashboard.modules.job.job_supervisor).
RAY_JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def local_state_path(path: str) -> str:
    """Where a relative path that kdray keeps state in (its logs, the embedded S3's data, default run folders)
    goes: the current folder, except in the driver of a submitted Ray job, whose current folder is Ray's
    unpacked copy of ``--working-dir``. Ray deletes that copy later, and on a one-machine multi-node cluster
    another raylet unpacks the same package over it while the job runs (measured: the embedded S3's files
    vanished mid-job and every read failed). There, it goes under the home folder instead."""
    if os.path.isabs(path) or RAY_JOB_DRIVER_ENV not in os.environ:
        return path
    return os.path.join(os.path.expanduser("~"), path)


def setup_logging(verbose: bool = False, job: str = "kdray") -> str | None:
    """Log to the console, and when quiet (the default) everything else to a log file; returns its path.

    Quiet: the console gets warnings, errors, stage headers and progress; Ray's per-operator
    progress, worker output and every INFO record go to ``.kdray/logs/<job>-<time>.log`` (or
    ``$KDRAY_LOG_DIR``; ``~/.kdray/logs`` in a submitted Ray job, :func:`local_state_path`). ``--verbose`` prints
    everything, as Ray does. The choice is kept in :func:`log_settings` for Ray's setup to follow.
    """
    global _LOG_SETTINGS
    level = os.environ.get("KDRAY_LOG_LEVEL", "INFO").upper()
    if verbose:
        _LOG_SETTINGS = LogSettings(verbose=True)
        logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S")
        for noisy in ("ray", *NOISY_LIBRARIES):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))
        return None
    folder = os.environ.get("KDRAY_LOG_DIR") or local_state_path(os.path.join(".kdray", "logs"))
    os.makedirs(folder, exist_ok=True)
    path = os.path.abspath(os.path.join(folder, f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))
    _LOG_SETTINGS = LogSettings(log_file=path)
    root = logging.getLogger()
    root.setLevel(level)
    to_file = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file for a job that logs nothing
    to_file.setFormatter(logging.Formatter(FORMAT))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    console.addFilter(_ConsoleFilter())
    root.handlers[:] = [to_file, console]
    logging.captureWarnings(True)
    for noisy in NOISY_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


def run_job(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a job's main; user errors print one line (``error: ...``) and exit 2, with no traceback.

    ``--verbose`` (anywhere in ``argv``) prints every log line instead of writing them to a file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(flag in argv for flag in VERBOSE_FLAGS)
    argv = [a for a in argv if a not in VERBOSE_FLAGS]
    job = main.__module__.rsplit(".", 1)[-1] if main.__module__ != "__main__" else \
        os.path.splitext(os.path.basename(sys.argv[0]))[0] or "kdray"
    log_file = setup_logging(verbose, job)
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
    except Exception:
        if log_file:
            logging.getLogger("kdray").exception("failed")
            print(f"the full log: {log_file}", file=sys.stderr)
        raise


def kdray_error_in(exc: BaseException) -> str | None:
    """The message of the kdray error at the root of ``exc`` (through Ray's wrapping of a task's or actor's
    error, which Ray Data keeps only as text: ``kdray.storage.S3Unavailable: ...``), or None if there is none."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    seen, chain = set(), [exc]
    while chain:
        current = chain.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # (a RayTaskError is also an instance of its cause's class, but its text is the whole remote traceback)
        if isinstance(current, KdrayError) and not (ray_exceptions and isinstance(current, ray_exceptions.RayError)):
            return str(current)
        chain += [getattr(current, "cause", None), current.__cause__, current.__context__]
    match = re.search(r"kdray\.[a-z_.]*[A-Z]\w*: (.+)", str(exc))
    return match.group(1).strip() if match else None


def root_cause(exc: BaseException) -> str:
    """The one line that says why: the kdray error inside Ray's wrapping, else the innermost cause's error line
    (the last line of a remote traceback that Ray carries as text, the first line of a plain message)."""
    message = kdray_error_in(exc)
    if message is not None:
        return message
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    remote = len(lines) > 1 and any(line.startswith("Traceback (most recent call last)") for line in lines)
    return f"{type(exc).__name__}: {first_line(lines[-1] if remote else lines[0], 300)}"


@contextmanager
def kdray_errors_from_ray() -> Iterator[None]:
    """Inside: a Ray task or actor that failed with a kdray error (a refused input, S3 away after the retry
    budget) raises that error's one line as a :class:`KdrayError`; any other failure is raised unchanged."""
    try:
        yield
    except Exception as exc:
        message = kdray_error_in(exc)
        if message is None or (isinstance(exc, KdrayError) and str(exc) == message):
            raise
        raise KdrayError(message) from None


def _print_doc_on_help(module: str, argv: list[str]) -> None:
    """With --help, a job first prints its module docstring (its usage); the options follow from load_config."""
    doc = getattr(sys.modules.get(module), "__doc__", None)
    if doc and any(arg in ("-h", "--help") for arg in argv):
        print(doc.strip() + "\n")
