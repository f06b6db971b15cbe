import os
import time

import pyarrow as pa
import pytest

from kdray import KdrayError, storage


def test_local_round_trip_is_atomic(tmp_path):
    target = tmp_path / "a" / "b.json"
    storage.write_json(str(target), {"x": 1})
    assert storage.read_json(str(target)) == {"x": 1}
    assert storage.read_json("file://" + str(target)) == {"x": 1}
    assert os.listdir(target.parent) == ["b.json"]  # no temporary files left behind
    storage.write_parquet(str(target.parent / "c.parquet"), pa.table({"id": ["a"], "p": [0.5]}))
    assert storage.read_parquet(str(target.parent / "c.parquet")).to_pydict() == {"id": ["a"], "p": [0.5]}


def test_a_write_stopped_before_its_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """A job killed between a local write's two steps: the final name still holds the previous content."""
    target = tmp_path / "b.json"
    storage.write_json(str(target), {"x": 1})

    def killed(fs, tmp, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_move_into_place", killed)
    with pytest.raises(KeyboardInterrupt):
        storage.write_json(str(target), {"x": 2})
    assert storage.read_json(str(target)) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the temporary copy, unrenamed


def test_the_slow_write_hook_reaches_a_fresh_interpreter(tmp_path):
    """tests/fault_hooks.py: a process started with its environment waits before each rename; one without,
    and kdray.storage in this process, do not."""
    import subprocess
    import sys

    from fault_hooks import slow_writes_env

    script = ("import sys, time; from kdray import storage; t = time.monotonic(); "
              "storage.write_bytes(sys.argv[1], b'x'); print(time.monotonic() - t)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    slow = subprocess.run([sys.executable, "-c", script, str(tmp_path / "slow")], capture_output=True, text=True,
                          env=slow_writes_env(env, tmp_path / "hook", 0.4), timeout=60)
    plain = subprocess.run([sys.executable, "-c", script, str(tmp_path / "plain")], capture_output=True, text=True,
                           env=env, timeout=60)
    assert slow.returncode == plain.returncode == 0, slow.stderr + plain.stderr
    assert float(slow.stdout) >= 0.4 > float(plain.stdout)
    assert (tmp_path / "slow").read_bytes() == b"x"
    assert storage._move_into_place.__module__ == "kdray.storage"


@pytest.mark.parametrize("uri, message", [("", "empty"), ("gs://bucket/x", "unsupported URI scheme"),
                                          ("s3://", "needs a bucket")])
def test_resolve_rejects_bad_uris(uri, message):
    with pytest.raises(KdrayError, match=message):
        storage.resolve(uri)


def test_missing_local_paths(tmp_path):
    with pytest.raises(KdrayError, match="no such file"):
        storage.read_bytes(str(tmp_path / "nope"))
    with pytest.raises(KdrayError, match="no such file or folder"):
        storage.list_files(storage.resolve(str(tmp_path / "nope")))


@pytest.mark.integration
def test_s3_round_trip_and_listing(local_s3, s3_bucket):
    base = f"s3://{s3_bucket}/storage-test"
    storage.write_bytes(f"{base}/x/1.bin", b"one")
    storage.write_json(f"{base}/x/2.json", {"two": 2})
    storage.write_parquet(f"{base}/x/3.parquet", pa.table({"id": ["a", "b"], "p": [0.25, 0.75]}))
    assert storage.read_bytes(f"{base}/x/1.bin") == b"one"
    assert storage.read_parquet(f"{base}/x/3.parquet").to_pydict() == {"id": ["a", "b"], "p": [0.25, 0.75]}
    files = storage.list_files(storage.resolve(base))
    assert [f.base_name for f in files] == ["1.bin", "2.json", "3.parquet"]
    assert storage.exists(f"{base}/x/2.json") and not storage.exists(f"{base}/x/3.json")


@pytest.mark.integration
def test_s3_missing_bucket_is_named(local_s3):
    with pytest.raises(KdrayError, match="bucket 'no-such-bucket' does not exist"):
        storage.list_files(storage.resolve("s3://no-such-bucket/data"))
    with pytest.raises(KdrayError, match="bucket 'no-such-bucket' does not exist"):
        storage.write_bytes("s3://no-such-bucket/x.bin", b"x")


@pytest.mark.integration
def test_s3_unreachable_endpoint(monkeypatch, local_s3):
    from cluster.local.s3 import port_is_free

    port = next(p for p in range(23000, 23100) if port_is_free(p))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("KDRAY_S3_RETRY_S", "0.5")
    with pytest.raises(KdrayError, match=f"cannot reach S3 at http://127.0.0.1:{port} .* after retrying"):
        storage.list_files(storage.resolve("s3://kdray-test/data"))


# ----------------------------------------------------------------------------- retrying an unreachable S3

REFUSED = ("When reading information for key 'a.png' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject "
           "operation: curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1:1")


class Flaky:
    """A storage call that raises ``errors`` one after another, then returns "ok"; counts its calls."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.parametrize("message", [
    REFUSED,
    "When writing key 'x': AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.",
    "AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Service Unavailable",
    "AWS Error INTERNAL_FAILURE during ListObjectsV2 operation: We encountered an internal error.",
    "AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached",
], ids=["refused", "slow-down", "503", "internal-error", "timeout"])
def test_transient_s3_failures_are_retried_until_they_pass(message, caplog, monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_START_S", 0.01)
    flaky = Flaky(OSError(message), OSError(message))
    with caplog.at_level("WARNING", logger="kdray.storage"):
        assert storage.retrying(flaky, "s3://b/a.png", "reading", budget_s=30) == "ok"
    assert flaky.calls == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("retrying reading s3://b/a.png for up to" in w for w in warnings)


@pytest.mark.parametrize("error", [
    FileNotFoundError("[Errno 2] Path does not exist 'b/a.png'"),
    OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body."),
    OSError("AWS Error NO_SUCH_BUCKET during HeadObject operation: The specified bucket does not exist"),
    KdrayError("s3://b/a.png: no such file"),
    storage.S3Unavailable("s3://b/a.png: cannot reach S3 (an inner call already spent the budget)"),
    ValueError("not storage at all"),
    IsADirectoryError("[Errno 21] Is a directory: '/data/Timeout'"),  # a local error that merely looks alike
], ids=["missing-file", "access-denied", "no-bucket", "kdray-error", "budget-spent-inside", "not-storage", "local"])
def test_other_failures_are_not_retried(error):
    from kdray.images import ImageRefused

    for exc in (error, ImageRefused("truncated", "cut short")):
        flaky = Flaky(exc)
        with pytest.raises(type(exc)):
            storage.retrying(flaky, "s3://b/a.png", budget_s=30)
        assert flaky.calls == 1


def test_the_budget_bounds_the_retries_then_one_clear_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setattr(storage, "BACKOFF_START_S", 0.05)
    flaky = Flaky(*[OSError(REFUSED)] * 1000)
    started = time.monotonic()
    with pytest.raises(storage.S3Unavailable) as err:
        storage.retrying(flaky, "s3://b/a.png", budget_s=1.0)
    took = time.monotonic() - started
    assert 1.0 <= took < 2.0 and 4 <= flaky.calls < 20  # backoff: not a busy loop, and stops at the budget
    assert str(err.value) == ("s3://b/a.png: cannot reach S3 at http://127.0.0.1:1 (curlCode: 7, Could not connect "
                              "to server) after retrying for 1 s; once it is back, re-run the same command to resume")
    flaky = Flaky(*[OSError(REFUSED)] * 10)
    with pytest.raises(storage.S3Unavailable):  # budget 0: one attempt, then the same clear line
        storage.retrying(flaky, "s3://b/a.png", budget_s=0)
    assert flaky.calls == 1


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(storage.RETRY_ENV, raising=False)
    assert storage.retry_budget_s() == storage.DEFAULT_RETRY_S == 120
    monkeypatch.setenv(storage.RETRY_ENV, "0.2")
    flaky = Flaky(*[OSError(REFUSED)] * 1000)
    started = time.monotonic()
    with pytest.raises(storage.S3Unavailable):
        storage.retrying(flaky, "s3://b/a.png")
    assert time.monotonic() - started < 1.0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(storage.RETRY_ENV, bad)
        with pytest.raises(KdrayError, match=f"{storage.RETRY_ENV}=.*must be a number of seconds >= 0"):
            storage.retry_budget_s()
    from kdray.raycluster import FORWARDED_ENV

    assert storage.RETRY_ENV in FORWARDED_ENV  # Ray workers retry for as long as the driver


def test_storage_calls_retry_and_name_the_uri(monkeypatch, tmp_path):
    """The storage functions go through retrying: a transient failure of the filesystem is retried, not reported."""
    import pyarrow.fs as pafs

    target = tmp_path / "x.bin"
    target.write_bytes(b"data")
    loc = storage.resolve(str(target))
    real = pafs.LocalFileSystem()
    flaky = Flaky(OSError(REFUSED))

    class Unreliable:  # a filesystem whose first request fails as an unreachable S3 does
        def open_input_stream(self, path):
            flaky()
            return real.open_input_stream(path)

    monkeypatch.setattr(storage, "BACKOFF_START_S", 0.01)
    assert storage.read_bytes(storage.Location(Unreliable(), loc.path, loc.uri)) == b"data"
    assert flaky.calls == 2


@pytest.mark.unit
def test_temporary_credentials_carry_their_session_token(monkeypatch):
    """Keys from SSO or an assumed role come with AWS_SESSION_TOKEN; S3 refuses them without it."""
    import pyarrow.fs as pafs

    from kdray.raycluster import worker_env_vars

    seen = {}
    monkeypatch.setattr(pafs, "S3FileSystem", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-123")
    storage.s3_filesystem()
    assert (seen["access_key"], seen["session_token"]) == ("ASIAEXAMPLE", "token-123")
    assert "AWS_SESSION_TOKEN" not in worker_env_vars()  # a secret: never in a runtime_env (tests/test_secrets.py)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    seen.clear()
    storage.s3_filesystem()
    assert "session_token" not in seen


# ----------------------------------------------------------------------------- listing a local folder: links, loops


def test_walk_lists_each_real_file_once_through_link_loops(tmp_path):
    """One loop used to list a file 80 times, two nested loops 2^depth times: each real folder is walked once."""
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"x")
    (root / "a" / "b" / "y.png").write_bytes(b"y")
    (root / "a" / "loop").symlink_to("..")  # a loop
    (root / "a" / "b" / "up").symlink_to("../..")  # a second loop, nested in the first
    (root / "a" / "b" / "self").symlink_to(".")
    (root / "again.png").symlink_to("a/x.png")  # the same file by a second name
    assert storage.walk_local(str(root)) == ["a/b/y.png", "a/x.png"]


def test_walk_lists_links_out_broken_links_and_fifos_for_the_reader_to_refuse(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"s")
    (root / "ok.png").write_bytes(b"o")
    (root / "out.png").symlink_to(outside / "secret.png")
    (root / "outdir").symlink_to(outside)  # a folder out of the root: not walked
    (root / "broken.png").symlink_to(root / "nowhere.png")
    os.mkfifo(root / "pipe.png")
    assert storage.walk_local(str(root)) == ["broken.png", "ok.png", "out.png", "outdir", "pipe.png"]
    roots = [storage.root_of(str(root))]
    assert storage.within_roots(str(root / "out.png"), roots) is None  # refused when read: outside_roots
    assert storage.within_roots(str(root / "ok.png"), roots) == os.path.realpath(root / "ok.png")
    # links into another allowed root are followed, and its file is listed once (by the first link)
    assert storage.walk_local(str(root), [storage.root_of(str(outside))]) == [
        "broken.png", "ok.png", "out.png", "pipe.png"]
    (root / "out.png").unlink()
    assert storage.walk_local(str(root), [storage.root_of(str(outside))]) == [
        "broken.png", "ok.png", "outdir/secret.png", "pipe.png"]


@pytest.mark.parametrize("uri, inside", [
    ("s3://data/scans/a.png", True), ("s3://data/scans/./x//a.png", True), ("s3://data/scans/../other/a.png", False),
    ("s3://data/scans-old/a.png", False), ("s3://other-bucket/scans/a.png", False), ("gs://data/scans/a.png", False),
    ("/etc/hostname", False), ("file:///etc/hostname", False)])
def test_within_roots_holds_s3_keys_to_their_bucket_and_prefix(uri, inside):
    assert (storage.within_roots(uri, [storage.root_of("s3://data/scans/")]) is not None) == inside


# ----------------------------------------------------------------------------- one run per output folder


def _lock(tmp_path, **kw) -> storage.OutputLock:
    return storage.OutputLock(storage.resolve(str(tmp_path / "out" / "_lock.json")), settle_s=0.01, **kw)


def test_a_live_holder_refuses_a_second_run_with_one_line(tmp_path):
    with _lock(tmp_path, heartbeat_s=0.02) as first:
        with pytest.raises(storage.OutputLocked) as err:
            _lock(tmp_path).acquire()
        message = str(err.value)
        assert "\n" not in message and first.run_id in message and "heartbeat 0 s ago" in message
        assert f"host {os.uname().nodename}" in message and "wait for it to end or stop it" in message
        beat = storage.read_lock(first.loc)["heartbeat"]
        time.sleep(0.1)
        assert storage.read_lock(first.loc)["heartbeat"] > beat and first.holds()  # renewed by its heartbeat
    assert storage.read_lock(first.loc) is None  # released


def test_a_lock_left_by_a_dead_process_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held = _lock(tmp_path)
    held._write()  # as if that process had taken it, then been killed with kill -9
    record = storage.read_lock(held.loc)
    storage.write_json(held.loc, {**record, "pid": int(dead.stdout), "started": "1"})
    (tmp_path / "out" / ".tmp-0123-_lock.json").write_text("{")  # killed in the middle of a heartbeat
    with _lock(tmp_path, ttl_s=3600) as taker:  # its heartbeat is fresh: only the pid says it is dead
        assert storage.read_lock(taker.loc)["run"] == taker.run_id
        assert os.listdir(tmp_path / "out") == ["_lock.json"]
    assert storage.lock_holder_gone({**record, "started": "1"}, 3600).startswith("its process")  # a reused pid


def test_a_lock_whose_heartbeat_stopped_is_taken_over_after_the_ttl(tmp_path):
    held = _lock(tmp_path)
    held._write()
    record = storage.read_lock(held.loc)
    elsewhere = {**record, "host": "another-pod", "heartbeat": time.time() - 30}  # its pid means nothing here
    storage.write_json(held.loc, elsewhere)
    with pytest.raises(storage.OutputLocked, match="heartbeat 30 s ago"):
        _lock(tmp_path, ttl_s=60).acquire()
    with _lock(tmp_path, ttl_s=10) as taker:
        assert taker.holds() and not held.holds()


@pytest.mark.unit
def test_refused_access_names_the_keys_never_their_values(monkeypatch):
    """S3's refusal says what to check: the variables' names with keys set, what the node needs without."""
    loc = storage.resolve("s3://bucket/a.png")
    refused = OSError("AWS Error ACCESS_DENIED during HeadObject operation: Access Denied")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDCANARY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-canary")
    message = str(storage._explain(loc, refused))
    assert "AWS_SECRET_ACCESS_KEY" in message and "canary" not in message.lower(), message
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = str(storage._explain(loc, refused))
    assert "no AWS keys" in message and "node needs S3 credentials of its own" in message, message
