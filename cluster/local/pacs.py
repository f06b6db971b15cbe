"""A local PACS (Orthanc with its DICOMweb plugin) for tests and the demo, off the machine's network.

Orthanc 1.10 has no bind-address option: its HTTP and DICOM ports listen on every interface. So it runs in a
network namespace of its own, joined to this host by one veth pair on a private /30: the PACS answers at
``10.213.X.Y+2`` and sees this host as ``10.213.X.Y+1`` (where a DIMSE listener for its pushes binds). Nothing
else reaches that link (the namespace has no other interface, and the host does not forward). Needs root
(``ip netns``), Debian's ``orthanc`` and ``orthanc-dicomweb``.

Library use::

    with LocalPacs(".kdray/pacs") as pacs:       # starts, waits until DICOMweb answers, stops on exit
        os.environ.update(pacs.env())            # KDRAY_DICOMWEB_URL, KDRAY_PACS_USER, KDRAY_PACS_PASSWORD, ...

Command line: ``cluster/local_pacs.sh start|stop|status``, and ``seed N`` to store N synthetic DX instances
(``python -m cluster.local.pacs``). Kept in the data directory: ``orthanc.json`` (the configuration, mode 0600:
it holds the password), ``orthanc.log``, ``orthanc.pid``, ``pacs.env`` (``export K=V`` lines, mode 0600) and the
database.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kdray import KdrayError

logger = logging.getLogger("cluster.local.pacs")

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
HTTP_PORT, DICOM_PORT = 8042, 4242
AET = "KDRAYPACS"
USER = "kdray"
STOP_GRACE_S = 10.0


class LocalPacsError(KdrayError):
    pass


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise LocalPacsError(f"{' '.join(args)} failed: {done.stderr.strip()[:300]}")


class LocalPacs:
    """Orthanc in network namespace ``kdpacs-<8 hex>`` (from ``data_dir``), its state kept in ``data_dir``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        tag = hashlib.sha256(str(self.data_dir).encode()).hexdigest()
        self.namespace = f"kdpacs-{tag[:8]}"
        self.host_link, self.pacs_link = f"kp{tag[:8]}h", f"kp{tag[:8]}n"  # interface names: at most 15 chars
        subnet = int(tag[8:12], 16) % (256 * 64)  # one of 16,384 /30s in 10.213.0.0/16
        base = f"10.213.{subnet // 64}.{(subnet % 64) * 4}"
        prefix = base.rsplit(".", 1)[0]
        last = int(base.rsplit(".", 1)[1])
        self.host_address, self.pacs_address = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"

    # -- where things are
    @property
    def pid_path(self) -> Path:
        return self.data_dir / "orthanc.pid"

    @property
    def env_path(self) -> Path:
        return self.data_dir / "pacs.env"

    @property
    def url(self) -> str:
        return f"http://{self.pacs_address}:{HTTP_PORT}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def password(self) -> str:
        config = json.loads((self.data_dir / "orthanc.json").read_text())
        return config["RegisteredUsers"][USER]

    def auth(self) -> tuple[str, str]:
        return USER, self.password()

    def env(self) -> dict[str, str]:
        return {"KDRAY_PACS_URL": self.url, "KDRAY_DICOMWEB_URL": self.dicomweb_url, "KDRAY_PACS_USER": USER,
                "KDRAY_PACS_PASSWORD": self.password(), "KDRAY_DICOMWEB_USER": USER,  # (what kdray's jobs read)
                "KDRAY_DICOMWEB_PASSWORD": self.password(), "KDRAY_PACS_AET": AET,
                "KDRAY_PACS_DICOM": f"{self.pacs_address}:{DICOM_PORT}", "KDRAY_PACS_PEER": self.host_address}

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.data_dir / "orthanc.json").encode() in cmdline else None

    # -- start and stop
    def start(self, timeout: float = 60.0) -> "LocalPacs":
        if self.pid is not None:
            logger.info("local PACS already running (pid %d) at %s", self.pid, self.url)
            return self
        orthanc = shutil.which("Orthanc")
        if orthanc is None or not Path(PLUGIN).exists():
            raise LocalPacsError("Orthanc or its DICOMweb plugin is missing: apt-get install orthanc orthanc-dicomweb")
        if os.geteuid() != 0:
            raise LocalPacsError("the local PACS runs in a network namespace of its own, which needs root")
        (self.data_dir / "db").mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._make_network()
        log = open(self.data_dir / "orthanc.log", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace, orthanc, str(self.data_dir / "orthanc.json")],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        self.pid_path.write_text(str(proc.pid))
        self._wait_ready(proc, timeout)
        self.env_path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items()))
        self.env_path.chmod(0o600)
        logger.info("local PACS (Orthanc) at %s, DICOMweb %s, DIMSE %s:%d AE %s", self.url, self.dicomweb_url,
                    self.pacs_address, DICOM_PORT, AET)
        return self

    def _write_config(self) -> None:
        path = self.data_dir / "orthanc.json"
        password = json.loads(path.read_text())["RegisteredUsers"][USER] if path.exists() else \
            secrets.token_urlsafe(24)
        config = {
            "Name": "kdray-local-pacs", "StorageDirectory": str(self.data_dir / "db"),
            "IndexDirectory": str(self.data_dir / "db"), "HttpPort": HTTP_PORT, "DicomPort": DICOM_PORT,
            "DicomAet": AET, "DicomCheckCalledAet": True, "RemoteAccessAllowed": True,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: password},
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
            "DicomModalities": {}, "OrthancPeers": {}, "HttpsVerifyPeers": True,
            "ExecuteLuaEnabled": False, "RestApiWriteToFileSystemEnabled": False, "StableAge": 2,
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent=1)

    def _make_network(self) -> None:
        if self.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
            _run("ip", "netns", "add", self.namespace)
        _run("ip", "-n", self.namespace, "link", "set", "lo", "up")
        links = subprocess.run(["ip", "link", "show", self.host_link], capture_output=True, text=True)
        if links.returncode != 0:
            _run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.pacs_link)
            _run("ip", "link", "set", self.pacs_link, "netns", self.namespace)
            _run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_link)
            _run("ip", "-n", self.namespace, "addr", "add", f"{self.pacs_address}/30", "dev", self.pacs_link)
        _run("ip", "link", "set", self.host_link, "up")
        _run("ip", "-n", self.namespace, "link", "set", self.pacs_link, "up")

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LocalPacsError(f"Orthanc exited with {proc.returncode}; see {self.data_dir / 'orthanc.log'}")
            try:
                if requests.get(f"{self.dicomweb_url}/studies?limit=1", auth=self.auth(), timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise LocalPacsError(f"Orthanc did not answer DICOMweb within {timeout:.0f} s; see "
                             f"{self.data_dir / 'orthanc.log'}")

    def stop(self) -> None:
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while self.pid is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.pid is not None:
                os.killpg(pid, signal.SIGKILL)  # Orthanc can be slow on SIGTERM
                time.sleep(0.5)
        self.pid_path.unlink(missing_ok=True)
        self.env_path.unlink(missing_ok=True)
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True)  # removes both ends
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)

    def seed(self, instances: int, per_study: int = 10, side: int = 256) -> int:
        """Store ``instances`` synthetic chest X-rays (:mod:`cluster.local.demo_data`) as 12-bit DX instances,
        ``per_study`` to a study, for a demo or a test; returns how many the PACS took."""
        import numpy as np

        from cluster.local.demo_data import CLASSES, dicom_bytes, make_image

        rng = np.random.default_rng(instances)
        with requests.Session() as s:
            s.auth = self.auth()
            for i in range(instances):
                pixels = make_image(CLASSES[i % len(CLASSES)], side, rng).astype(np.uint16) * 16
                data = dicom_bytes(pixels, modality="DX", PatientID=f"DEMO{i // per_study:04d}",
                                   StudyInstanceUID=f"1.2.826.0.1.3680043.10.9.{instances}.{i // per_study}")
                s.post(f"{self.url}/instances", data=data, timeout=60).raise_for_status()
        logger.info("stored %d synthetic DX instance(s) in %d stud(ies)", instances, -(-instances // per_study))
        return instances

    def __enter__(self) -> "LocalPacs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local.pacs", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status", "seed"))
    parser.add_argument("instances", nargs="?", type=int, default=20, help="seed: synthetic DX instances to store")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[2] / ".kdray" / "pacs"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    pacs = LocalPacs(args.dir)
    try:
        if args.command == "start":
            pacs.start()
            print(f"# local PACS: DICOMweb {pacs.dicomweb_url} (user {USER}); credentials in {pacs.env_path}:")
            print(f"source {shlex.quote(str(pacs.env_path))}")
        elif args.command == "seed":
            if pacs.pid is None:
                raise LocalPacsError("the local PACS is not running: cluster/local_pacs.sh start")
            pacs.seed(args.instances)
        elif args.command == "stop":
            pacs.stop()
        else:
            print(f"running (pid {pacs.pid}) at {pacs.url}" if pacs.pid else "not running")
    except LocalPacsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
