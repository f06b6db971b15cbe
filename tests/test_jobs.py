"""The job entry points as users run them: one-line errors, usage, the ``kdray`` command.

Each job subprocess imports torch (several seconds on a 2-core machine), so those tests are ``integration``
even without services. ``ray job submit`` to a running cluster is tested in ``tests/test_multinode.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_job(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/xrays"], "/nonexistent/xrays/train: no such file or folder"),
    (["--data", "{empty}"], "folder is empty"),
    (["--data", "{flat}"], "no class folders"),
    (["--epochs", "lots"], "config key optim.epochs: must be a valid integer, got 'lots'"),
])
def test_train_teacher_bad_input(tmp_path, args, message):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "x.png").write_bytes(b"x")
    args = [a.format(empty=tmp_path / "empty", flat=tmp_path / "flat") for a in args]
    proc = run_job("jobs.train_teacher", *args, "--output", str(tmp_path / "runs"))
    assert_one_line_error(proc, message)
    assert not (tmp_path / "runs").exists()  # nothing left behind that looks like a run


@pytest.mark.integration
def test_s3_bad_input(local_s3, tmp_path):
    proc = run_job("jobs.train_teacher", "--data", "s3://no-such-bucket/xrays")
    assert_one_line_error(proc, "S3 bucket 'no-such-bucket' does not exist")
    from cluster.local.s3 import port_is_free

    port = next(p for p in range(23100, 23200) if port_is_free(p))
    proc = run_job("jobs.score", "--model", str(tmp_path), "--input", "s3://kdray-test/x", "--output", str(tmp_path),
                   env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "KDRAY_S3_RETRY_S": "1"})
    assert proc.returncode == 2 and "error: " in proc.stderr and "Traceback" not in proc.stderr


LOG_SETTINGS = """
import os, sys
from kdray.runner import log_settings, setup_logging
before = dict(os.environ)
path = setup_logging(verbose=sys.argv[1] == "verbose", job="t")
assert dict(os.environ) == before, "setup_logging changed the environment"
print(log_settings().verbose, log_settings().log_file == path, path is None)
"""


@pytest.mark.parametrize("mode, expected", [("verbose", "True True True"), ("quiet", "False True False")])
def test_logging_choice_is_state_not_an_environment_variable(tmp_path, mode, expected):
    """--verbose and the log file reach init_ray through kdray.runner.log_settings, not through os.environ."""
    proc = subprocess.run([sys.executable, "-c", LOG_SETTINGS, mode], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "KDRAY_LOG_DIR": str(tmp_path)}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == expected.split()


def test_kdray_command_lists_stages():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for stage in ("train-teacher", "build-cache", "train-student", "evaluate", "export", "score", "predict",
                  "pipeline", "make-data"):
        assert stage in proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize("command", [["-m", "jobs.train_student"], ["-m", "jobs.cli", "evaluate"]])
def test_job_help_prints_usage_and_every_option_with_its_default(command):
    proc = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "python -m jobs." in proc.stdout  # the job's usage line, from its docstring
    if command[-1] == "jobs.train_student":
        assert '--kd.views 0' in proc.stdout and '--optim.lr 0.001' in proc.stdout  # job defaults over config ones
    else:
        assert '--split "val"' in proc.stdout
