"""cluster.local.s3: a real SeaweedFS server on loopback (about 15 s in all)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import s3 as local_s3_mod
from cluster.local.s3 import LocalS3, LocalS3Error

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # a reparented zombie (CLI case) is dead for our purposes
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening_socket() -> socket.socket:
    """A socket listening on a loopback port p whose p+10000 is free too (a valid S3 port)."""
    for port in range(23000, 24000):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        if local_s3_mod.port_is_free(port + local_s3_mod.GRPC_OFFSET):
            sock.listen()
            return sock
        sock.close()
    raise RuntimeError("no free port for the test")


def test_env_and_files(local_s3: LocalS3) -> None:
    env = local_s3.env()
    assert env["AWS_ENDPOINT_URL"] == local_s3.endpoint_url == f"http://127.0.0.1:{local_s3.s3_port}"
    assert env["AWS_DEFAULT_REGION"] == env["AWS_REGION"] == "us-east-1"
    for key, value in env.items():
        assert os.environ[key] == value
    assert int((local_s3.data_dir / "weed.pid").read_text()) == local_s3.pid
    exports = (local_s3.data_dir / "s3.env").read_text()
    assert f"export AWS_ENDPOINT_URL={local_s3.endpoint_url}\n" in exports
    assert (local_s3.data_dir / "weed.log").stat().st_size > 0


def test_boto3_round_trip(local_s3: LocalS3, s3_bucket: str) -> None:
    import boto3

    local_s3.create_bucket(s3_bucket)  # idempotent
    s3 = boto3.client("s3")  # configured only by the AWS_* variables the fixture set
    s3.put_object(Bucket=s3_bucket, Key="hello/world.txt", Body=b"hello kdray")
    assert s3.get_object(Bucket=s3_bucket, Key="hello/world.txt")["Body"].read() == b"hello kdray"
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3_bucket in names


def test_pyarrow_multipart_round_trip(local_s3: LocalS3, s3_bucket: str) -> None:
    from pyarrow.fs import S3FileSystem

    fs = S3FileSystem(
        endpoint_override=f"127.0.0.1:{local_s3.s3_port}",
        scheme="http",
        access_key=local_s3.access_key,
        secret_key=local_s3.secret_key,
        region="us-east-1",
    )
    data = os.urandom(6 * 1024 * 1024 + 123)  # > 5 MiB: pyarrow uploads it in parts
    path = f"{s3_bucket}/big/blob.bin"
    with fs.open_output_stream(path) as out:
        for start in range(0, len(data), 1024 * 1024):
            out.write(data[start : start + 1024 * 1024])
    assert fs.get_file_info(path).size == len(data)
    with fs.open_input_stream(path) as inp:
        assert inp.read() == data


def test_stop_kills_the_process(tmp_path: Path) -> None:
    server = LocalS3(tmp_path / "s3").start()
    pid = server.pid
    assert pid is not None and _alive(pid)
    port = server.s3_port
    server.stop()
    assert not _alive(pid)
    assert server.pid is None
    assert not (tmp_path / "s3" / "weed.pid").exists()
    assert not (tmp_path / "s3" / "s3.env").exists()
    assert local_s3_mod.port_is_free(port)
    server.stop()  # idempotent


def test_port_in_use_fails_fast(tmp_path: Path) -> None:
    """Checked before the server is launched: no waiting for it to come up, no process left."""
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        server = LocalS3(tmp_path / "s3", s3_port=port)
        with pytest.raises(LocalS3Error, match=f"port {port} is already in use"):
            server.start(timeout=3)
    assert server.pid is None
    assert not (tmp_path / "s3" / "weed.pid").exists() and not (tmp_path / "s3" / "weed.log").exists()


def test_server_that_cannot_bind_fails_with_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the port is taken after the check (a race), weed exits and start() reports its log."""
    with _listening_socket() as busy:
        port = busy.getsockname()[1]
        monkeypatch.setattr(local_s3_mod, "port_is_free", lambda p: p != port)
        server = LocalS3(tmp_path / "s3", s3_port=port)
        monkeypatch.setattr(local_s3_mod, "_check_port_pair", lambda p: None)
        # the server's exit is reported as such (with its log), not as a server that never became ready
        with pytest.raises(LocalS3Error, match="(?s)exited with code .*address already in use"):
            server.start(timeout=20)
    assert server.pid is None
    assert not (tmp_path / "s3" / "weed.pid").exists()


def test_failure_message_keeps_the_fatal_line_that_a_stack_dump_pushed_out_of_the_tail(tmp_path: Path) -> None:
    server = LocalS3(tmp_path / "s3")
    server.log_path.parent.mkdir(parents=True)
    fatal = "F1130 09:08:24.201 s3.go:434] S3 API Server listening on 127.0.0.1:23000: address already in use"
    stack = [f"\tgithub.com/seaweedfs/seaweedfs/weed/glog/glog.go:{n} +0x85" for n in range(40)]
    server.log_path.write_text("\n".join(["I1130 09:08:24.100 master.go:1] starting", fatal, *stack, "I1130 last"]))
    message = str(server._fail("SeaweedFS exited with code 255 during start-up"))
    assert fatal in message and "I1130 last" in message
    assert "starting" not in message  # only the error lines and the tail
    assert message.index(fatal) < message.index("I1130 last")


def test_not_ready_within_timeout_stops_the_server(tmp_path: Path) -> None:
    server = LocalS3(tmp_path / "s3")
    with pytest.raises(LocalS3Error, match="not ready within 0.3 s"):
        server.start(timeout=0.3)
    assert server.pid is None
    assert not (tmp_path / "s3" / "weed.pid").exists()


def test_cli_start_detaches_and_stop_kills(tmp_path: Path) -> None:
    data_dir = tmp_path / "s3"
    cmd = [sys.executable, "-m", "cluster.local.s3"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = subprocess.run(
        [*cmd, "start", "--dir", str(data_dir), "--bucket", "cli-bucket"],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in started.stdout
    assert started.stdout == (data_dir / "s3.env").read_text()
    pid = int((data_dir / "weed.pid").read_text())
    try:
        assert _alive(pid)  # still serving after the CLI returned
        attached = LocalS3(data_dir).start(timeout=10)  # a second start attaches
        assert attached.pid == pid
        assert "cli-bucket" in [b["Name"] for b in attached.client().list_buckets()["Buckets"]]
    finally:
        stopped = subprocess.run(
            [*cmd, "stop", "--dir", str(data_dir)], capture_output=True, text=True, timeout=30, env=env, cwd=REPO_ROOT
        )
    assert stopped.returncode == 0, stopped.stderr
    assert not _alive(pid)


def test_cli_missing_weed_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(local_s3_mod.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert local_s3_mod.main(["start", "--dir", str(tmp_path / "s3")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: SeaweedFS 'weed' binary not found") and err.count("\n") == 1
