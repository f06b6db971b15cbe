"""kdray.ingress: Serve's HAProxy ingress with HAProxy's own listeners on loopback, and ``jobs.serve``, the README's
serving command, answering on the address it prints.

Unit: the configuration rewrite, the wrapper's exec (a stand-in binary), the node environment. e2e (its own Ray):
``python -m jobs.serve`` as the README runs it, HAProxy on the given port, every HAProxy listener on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdray import ingress

REPO = Path(__file__).resolve().parents[1]

# What Ray 2.60's template writes (ray/serve/_private/haproxy_templates.py), trimmed to its binds.
RAY_CONFIG = """frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
listen stats
  bind *:8404
  stats enable
frontend explicit
    bind 0.0.0.0:9000 proto h2
"""


@pytest.mark.unit
def test_wildcard_binds_move_to_the_admin_host_and_explicit_ones_stay() -> None:
    text = ingress.admin_binds_on(RAY_CONFIG, "127.0.0.1")
    binds = re.findall(r"bind (\S+)", text)
    assert binds == ["127.0.0.1:9101", "127.0.0.1:8000", "127.0.0.1:8404", "0.0.0.0:9000"]
    assert "bind [::1]:9101" in ingress.admin_binds_on(RAY_CONFIG, "::1")


@pytest.mark.unit
def test_the_wrapper_runs_the_real_binary_on_the_rewritten_copy(tmp_path: Path) -> None:
    """kdray-haproxy execs the real HAProxy (same pid: Ray's reloads check it) with ``-f`` pointing at the
    rewritten copy; every other argument passes as it was."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_CONFIG)
    seen = tmp_path / "seen"
    fake = tmp_path / "haproxy"
    fake.write_text(f"#!/bin/sh\necho \"$$ $*\" > {seen}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = subprocess.Popen([sys.executable, "-m", "kdray.ingress", "-db", "-f", str(config), "-sf", "41"],
                            env={**os.environ, ingress.REAL_BINARY_ENV: str(fake)})
    assert proc.wait(30) == 0
    pid, *args = seen.read_text().split()
    assert int(pid) == proc.pid
    assert args[:2] == ["-db", "-f"] and args[3:] == ["-sf", "41"]
    copy = Path(args[2])
    assert copy != config and "bind *:" not in copy.read_text() and "bind :" not in copy.read_text()
    assert config.read_text() == RAY_CONFIG  # Ray's own file is left as Ray wrote it


@pytest.mark.unit
def test_local_nodes_get_haproxy_with_private_ports_and_files(monkeypatch) -> None:
    from kdray.raycluster import NODE_ENV, local_node_env

    assert NODE_ENV[ingress.HAPROXY_ENV] == "1"
    monkeypatch.delenv(ingress.HAPROXY_ENV, raising=False)
    one, two = local_node_env(), local_node_env()
    assert one["RAY_SERVE_HAPROXY_BINARY_PATH"] == os.path.join(os.path.dirname(sys.executable), "kdray-haproxy")
    assert os.access(one["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK), "pip install -e . puts kdray-haproxy there"
    for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH"):
        assert one[key] != two[key], key  # two Rays on one machine share neither
    monkeypatch.setenv(ingress.HAPROXY_ENV, "0")
    assert ingress.HAPROXY_ENV not in local_node_env()
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in local_node_env()


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    import psutil

    return [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _haproxy_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_jobs_serve_answers_through_haproxy_on_the_readme_address(tiny_export, tmp_path: Path) -> None:
    """The README's command: ``python -m jobs.serve --model EXPORT`` then POST an image to the printed address.
    HAProxy is what listens there, and none of HAProxy's listeners (frontend, stats, metrics) is on anything
    but 127.0.0.1: Ray's own configuration binds stats and metrics on every interface."""
    import requests

    from cluster.local.demo_data import make_image
    from kdray.raycluster import free_loopback_port
    from PIL import Image

    port = free_loopback_port()
    image = tmp_path / "xray.png"
    import numpy as np

    Image.fromarray(make_image("covid", 64, np.random.default_rng(0))).save(image)
    before = _haproxy_pids()
    job = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--model", tiny_export[0], "--port", str(port),
                            "--replicas", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 240
        while "serving" not in line and time.time() < deadline and job.poll() is None:
            line = job.stdout.readline()
        assert f"at http://127.0.0.1:{port} " in line, line
        answer = requests.post(f"http://127.0.0.1:{port}/predict", data=image.read_bytes(),
                               headers={"content-type": "image/png"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_id"] == answer.headers["x-kdray-model"]
        page = requests.get(f"http://127.0.0.1:{port}/", headers={"accept": "text/html"}, timeout=60)  # the viewer
        assert page.status_code == 200 and 'src="viewer.js"' in page.text, page.text[:200]
        ours = _haproxy_pids() - before
        listeners = _listeners(ours)
        assert ("127.0.0.1", port) in listeners, listeners
        assert len(listeners) >= 3 and all(ip == "127.0.0.1" for ip, _ in listeners), listeners
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(90)
        except subprocess.TimeoutExpired:
            job.kill()
            raise
    assert job.returncode == 0
    deadline = time.time() + 30
    while (_haproxy_pids() - before) and time.time() < deadline:
        time.sleep(0.5)
    assert not (_haproxy_pids() - before), "HAProxy outlived the job"


# Ray 2.60's configuration for one app with one replica, as its template writes it (trimmed).
RAY_BACKEND_CONFIG = """global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    errorfile 502 {error}
    errorfile 503 {error}
    errorfile 504 {error}
    balance leastconn
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend http-kdray
backend http-kdray
    option httpchk GET /-/healthz
    server SERVE_REPLICA_kdray-StudentClassifier-abcd 127.0.0.1:30000 check observe layer4 error-limit 3 on-error mark-down
    server SERVE_PROXY_ACTOR-fallback-1d70 127.0.0.1:8500 check backup
listen stats
  bind *:{stats}
  stats enable
"""


@pytest.mark.unit
def test_the_shaped_configuration_queues_in_haproxy_and_answers_its_own_503(tmp_path: Path) -> None:
    """Each replica at most maxconn requests (the fallback proxy unlimited), a queue timeout, HAProxy's own 503 a
    503 with Retry-After and reason busy; the real HAProxy accepts the result (``haproxy -c``)."""
    error = tmp_path / "500.http"
    error.write_bytes(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_BACKEND_CONFIG.format(error=error, metrics=19101, port=18000, stats=18404))
    args = ingress.rewritten_args(["-f", str(config)], "127.0.0.1", maxconn=3, queue_timeout_s=7)
    shaped = Path(args[1]).read_text()
    replica, fallback = [line for line in shaped.splitlines() if line.strip().startswith("server ")]
    assert replica.split()[:4] == ["server", "SERVE_REPLICA_kdray-StudentClassifier-abcd", "127.0.0.1:30000",
                                   "maxconn"] and replica.split()[4] == "3"
    assert "maxconn" not in fallback
    assert "timeout queue 7s" in shaped
    busy = (tmp_path / "503-busy.http").read_bytes()
    assert f"errorfile 503 {tmp_path / '503-busy.http'}" in shaped and f"errorfile 502 {error}" in shaped
    assert busy.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in busy and b"x-kdray-reason: busy" in busy
    checked = subprocess.run([ingress.real_binary(), "-c", "-f", args[1]], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert ingress.shaped_config(config.read_text(), "127.0.0.1", 0, 7, None).count("maxconn") == 1  # off: global only
