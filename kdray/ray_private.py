"""Every use of Ray's private APIs, in one place, checked against the Ray that pyproject.toml pins.

Ray has no public way to do these; each function says why it is needed. tests/test_ray_private.py calls them on
a live Ray of :data:`CHECKED_RAY_VERSION` and fails when Ray moves under them, so that an upgrade finds them
here rather than in a stack trace. Callers treat a failure as "not available" where they can.
"""

from __future__ import annotations

import sys

#: The Ray release these functions were written for and tested against.
CHECKED_RAY_VERSION = "2.60.0"


def serve_http_address() -> tuple[str, int] | None:
    """(host, port) where the running Serve's proxy listens (Serve ignores new ``http_options`` once started,
    and says so nowhere public); None when it cannot be read."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - private API
        return None
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "", None) else http.host
    return host, int(http.port)


def serve_http_targets(app_name: str, timeout_s: float = 30.0) -> list[tuple[str, int]]:
    """(ip, port) of every HTTP target of an application: with direct ingress, each replica's own port (the
    public API lists replicas but not their ports)."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name), timeout=timeout_s)
    return [(t.ip, int(t.port)) for g in groups if "HTTP" in str(g.protocol).upper() and g.app_name == app_name
            for t in g.targets]


def refresh_loopback_constant(variable: str) -> None:
    """Ray reads ``variable`` (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) once, when it is imported, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``; a process that imported Ray before setting it keeps the
    stale copy, and ``ray.init`` then binds the machine's address instead of 127.0.0.1. Set the copy to what Ray
    would have read. The processes Ray starts import Ray afresh, with the variable in their environment."""
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = constants.env_bool(variable, not constants.IS_WINDOWS_OR_OSX)


def logs_dir() -> str | None:
    """The log folder of this node's Ray session (``/tmp/ray/session_*/logs``), where a Ray worker writes files of
    its own beside Ray's (the public API does not say where it is); None outside a Ray worker or driver."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is no Ray worker
    try:
        return ray._private.worker._global_node.get_logs_dir_path() if ray else None
    except Exception:  # noqa: BLE001 - private API, or Ray not started here
        return None
