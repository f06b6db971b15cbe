"""S3 outages (issue 16, item 5): SeaweedFS killed in the middle of scoring, the logit-cache build and an export.

Against this module's own SeaweedFS, never the shared one. The server is SIGKILLed mid-job; kdray retries for
``KDRAY_S3_RETRY_S`` seconds (BUDGET_S here), then the job ends with one line (``error: ...`` and exit code 2 for a
job) and no completion marker. Started again on the same data directory (same endpoint), the same command resumes
and finishes.

- scoring: ``python -m jobs.score`` (its own Ray); S3 dies once the first shard's ``_done`` marker is on S3, so
  the reads and writes of the other shards hit the outage in the Ray actors;
- the logit-cache build: ``logit_cache.build`` in this process with a Ray of its own; S3 dies after the driver
  has listed the data and read the teacher, as the Ray Data decode tasks start (they hit it);
- export: ``python -m jobs.export`` (no Ray); S3 dies once ``args.yaml`` is on S3, so the artifact writes hit it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_score import assert_exactly_once, exported_student, png  # noqa: F401 - exported_student is a fixture

from cluster.local.s3 import LocalS3
from kdray import storage

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
BUCKET = "kdray-outage"
BUDGET_S = 6  # KDRAY_S3_RETRY_S of the jobs here
EXIT_SLACK_S = 30  # job start-up is not counted (S3 dies mid-job); Ray's shutdown and the error path are
SCORED, SHARD = 48, 4


@pytest.fixture(scope="module")
def outage_s3(tmp_path_factory):
    """A private SeaweedFS (this module stops and starts it); AWS_* point at it in this process."""
    server = LocalS3(tmp_path_factory.mktemp("outage-s3"))
    with pytest.MonkeyPatch.context() as mp:
        server.start()
        try:
            server.create_bucket(BUCKET)
            for key, value in server.env().items():
                mp.setenv(key, value)
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3(outage_s3):
    outage_s3.start()  # running again if an earlier test failed while it was stopped
    return outage_s3


@pytest.fixture(scope="module")
def s3_data(outage_s3, tmp_path_factory) -> str:
    """A small ImageFolder set (3 classes, train 8 and val 6 per class, 32 px) on the private S3."""
    from cluster.local.demo_data import make_dataset

    outage_s3.start()  # (module fixtures come before the function-scoped `s3`: an earlier test may have left it down)
    local = tmp_path_factory.mktemp("outage-data")
    make_dataset(str(local), {"train": 8, "val": 6}, size=32, seed=3)
    uri = f"s3://{BUCKET}/data"
    storage.copy_dir(str(local), uri)
    return uri


@pytest.fixture
def job_env(s3, tmp_path):
    """The jobs' environment: this S3, a small retry budget, logs in tmp_path, and a Ray of their own (a private
    RAY_TMPDIR: a `ray start` head elsewhere on this machine writes /tmp/ray/ray_current_cluster, which a plain
    ray.init() would join)."""
    ray_tmp = tempfile.mkdtemp(prefix="kdo", dir="/tmp")  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3.env(), KDRAY_S3_RETRY_S=str(BUDGET_S), RAY_TMPDIR=ray_tmp, KDRAY_LOG_DIR=str(tmp_path / "logs"))
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def assert_s3_error_line(line: str, s3: LocalS3) -> None:
    assert "\n" not in line and f"cannot reach S3 at {s3.endpoint_url}" in line, line
    assert "after retrying for" in line and "re-run the same command" in line, line


def _s3_keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def run_and_kill_s3(cmd: list[str], env: dict, s3: LocalS3, mid_job, tmp_path: Path) -> tuple[int, str, float]:
    """Start the job; SIGKILL the S3 server once ``mid_job()`` is true; wait for the job to end on its own.
    Returns (exit code, stderr, the job's exit time)."""
    stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not mid_job():
            assert proc.poll() is None, f"the job ended before S3 was stopped:\n{stderr_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the job never reached the moment to stop S3"
            time.sleep(0.1)
        s3.stop(grace=0)  # SIGKILL at once (SeaweedFS shuts down slowly on SIGTERM)
        code = proc.wait(timeout=BUDGET_S + EXIT_SLACK_S + 60)
        return code, stderr_path.read_text(), time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def first_retry(log_dir: Path) -> float:
    """When the job first logged a retry (its log file has every record, the Ray workers' included)."""
    stamps = [line[:23] for p in log_dir.glob("*.log") for line in p.read_text(errors="replace").splitlines()
              if "S3 unreachable at" in line and "; retrying " in line]
    assert stamps, f"no retry in the job's log ({list(log_dir.glob('*.log'))})"
    return min(datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps)


def assert_clear_s3_error(code: int, stderr: str, ended: float, s3: LocalS3, log_dir: Path) -> None:
    """Exit code 2 with one ``error:`` line that names the endpoint and says how to resume, no traceback, after
    retrying for the budget but not much longer."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert_s3_error_line(lines[-1], s3)
    assert "Traceback" not in stderr
    retried_s = ended - first_retry(log_dir)
    assert BUDGET_S - 2 <= retried_s <= BUDGET_S + EXIT_SLACK_S, retried_s


def test_scoring_stops_cleanly_then_resumes_exactly_once(s3, job_env, exported_student, tmp_path):  # noqa: F811
    names = [f"d/{i:03d}.png" for i in range(SCORED)]
    for i, name in enumerate(names):
        storage.write_bytes(f"s3://{BUCKET}/score-in/{name}", png(seed=i))
    inputs, out = f"s3://{BUCKET}/score-in", f"s3://{BUCKET}/score-out"
    cmd = [sys.executable, "-m", "jobs.score", "--model", exported_student, "--input", inputs, "--output", out,
           "--shard_size", str(SHARD)]

    client = s3.client()
    code, stderr, ended = run_and_kill_s3(
        cmd, job_env, s3, lambda: any("/_done/part-" in k for k in _s3_keys(client, "score-out/")), tmp_path)
    assert_clear_s3_error(code, stderr, ended, s3, tmp_path / "logs")

    s3.start()  # same directory, same endpoint
    keys = _s3_keys(client, "score-out/")
    assert "score-out/summary.json" not in keys  # no completion marker
    done_before = [k for k in keys if "/_done/part-" in k]
    assert 1 <= len(done_before) < SCORED // SHARD
    for key in done_before:  # a shard counts as done only with every input scored or refused, none io_error
        assert json.loads(storage.read_bytes(f"s3://{BUCKET}/{key}"))["io_errors"] == 0

    rerun = subprocess.run(cmd, check=False, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = storage.read_json(f"{out}/summary.json")
    assert summary["images"] == SCORED and summary["errors"] == 0
    assert summary["shards_resumed"] >= len(done_before)  # the shards done before the outage were skipped
    assert summary["images_this_run"] == SCORED - SHARD * summary["shards_resumed"] < SCORED
    assert_exactly_once(out, {f"{inputs}/{name}" for name in names})


def test_logit_cache_build_stops_cleanly_then_finishes(s3, s3_data, tmp_path, monkeypatch):
    import ray
    from conftest import make_checkpoint

    from kdray import KdrayError, logit_cache
    from kdray.data import list_split
    from kdray.raycluster import init_ray

    ray_tmp = tempfile.mkdtemp(prefix="kdo", dir="/tmp")  # this test's own Ray (see job_env)
    for key, value in {"RAY_TMPDIR": ray_tmp, "KDRAY_S3_RETRY_S": str(BUDGET_S)}.items():
        monkeypatch.setenv(key, value)  # before Ray starts: its workers get the budget (FORWARDED_ENV)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    teacher = make_checkpoint(tmp_path / "teacher", "tiny_teacher", image_size=32)
    listing = list_split(s3_data, "train")
    out = f"s3://{BUCKET}/cache-run"
    real_load_split = logit_cache.load_split
    stopped = []

    def stop_s3_then_load(*args, **kwargs):  # the driver has hashed the teacher and listed the data
        s3.stop(grace=0)
        stopped.append(time.time())
        return real_load_split(*args, **kwargs)

    try:
        init_ray()
        monkeypatch.setattr(logit_cache, "load_split", stop_s3_then_load)
        with pytest.raises(KdrayError) as err:
            logit_cache.build(teacher, listing, 32, out)
        retried_s = time.time() - stopped[0]
        assert_s3_error_line(str(err.value), s3)  # one line out of Ray Data's wrapping of the decode task's error
        assert BUDGET_S <= retried_s <= BUDGET_S + EXIT_SLACK_S, retried_s  # the workers got the budget

        s3.start()
        assert not [k for k in _s3_keys(s3.client(), "cache-run/") if k.endswith(logit_cache.SIDECAR_FILE)]
        monkeypatch.setattr(logit_cache, "load_split", real_load_split)
        uri, reused = logit_cache.build(teacher, listing, 32, out)  # the same call again finishes
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not reused
    cache = logit_cache.open_cache(uri, listing, 32)  # complete, and of exactly this data
    assert sorted(cache.lookup()) == sorted(listing.image_ids)


def test_export_stops_cleanly_then_finishes(s3, job_env, s3_data, tmp_path):
    from conftest import make_checkpoint

    from kdray.predictor import MODEL_CARD_FILE

    student = make_checkpoint(tmp_path / "student", "tiny_student", image_size=32)
    out = f"s3://{BUCKET}/export-run"
    cmd = [sys.executable, "-m", "jobs.export", "--model", student, "--data", s3_data, "--output", out,
           "--calibration", "16", "--strict", "false"]

    client = s3.client()
    code, stderr, ended = run_and_kill_s3(
        cmd, job_env, s3, lambda: "export-run/args.yaml" in _s3_keys(client, "export-run/"), tmp_path)
    assert_clear_s3_error(code, stderr, ended, s3, tmp_path / "logs")

    s3.start()
    assert f"export-run/{MODEL_CARD_FILE}" not in _s3_keys(client, "export-run/")  # not committed

    rerun = subprocess.run(cmd, check=False, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    card = storage.read_json(f"{out}/{MODEL_CARD_FILE}")
    for artifact in [*card["artifacts"].values(), card["torch_weights"]]:  # every file whole, as the card says
        data = storage.read_bytes(f"{out}/{artifact['file']}")
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
