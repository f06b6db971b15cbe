"""Serving: start Ray Serve on loopback, deploy the student, and hand back the address to use.

``deploy(model_dir, port=8000)`` joins (or starts) Ray, starts Serve on 127.0.0.1:``port``, runs
:func:`serve.app.build_app`'s application and returns its base URL: with direct ingress and one replica, the
replica's own port (one Python hop fewer), else Serve's proxy. On a Ray that kdray started itself, autoscaling
is bounded by what its CPUs can hold. Ray's private serving APIs are reached through :mod:`kdray.ray_private`.
"""

from __future__ import annotations

import logging
import math
import os
import time

from ray import serve

from kdray import ray_private
from serve.app import ACCESS_LOG_OFF, APP_NAME, build_app
from serve.options import BATCHING, DEPLOYMENT

log = logging.getLogger(__name__)


def deploy(model_dir: str, port: int = 8000, backend: str = "auto", *, num_replicas: int | None = None,
           num_cpus: float | None = None, threads: int | None = None, batching: str | bool = BATCHING.enabled,
           name: str = APP_NAME, route_prefix: str = "/", **deployment_overrides) -> str:
    """Start Serve on 127.0.0.1:``port`` (joining or starting Ray), deploy the student, return its base URL.

    ``num_replicas`` fixes the replica count (autoscaling off); ``num_cpus`` sets each replica's CPUs;
    other deployment options (e.g. ``max_queued_requests``) override :mod:`serve.options`.
    If Serve is already running, its existing HTTP address is kept and returned.
    """
    from kdray.raycluster import init_ray, ray_started_here

    options = dict(deployment_overrides)
    if num_replicas is not None:
        options.update(num_replicas=int(num_replicas), autoscaling_config=None)
    init_ray()
    if num_cpus is None:
        num_cpus = _cpus_that_fit()
    if "autoscaling_config" not in options and ray_started_here():  # (num_replicas set it to None)
        options.setdefault("max_replicas", _replicas_that_fit(num_cpus))
    app = build_app(model_dir, backend, threads, batching, num_cpus=num_cpus, **options)
    serve.start(http_options={"host": "127.0.0.1", "port": int(port)}, proxy_location="HeadOnly",
                logging_config=ACCESS_LOG_OFF)
    # Serve ignores new http_options when it is already running: report where it really listens
    host, actual_port = ray_private.serve_http_address() or ("127.0.0.1", int(port))
    if actual_port != int(port):
        log.warning("Serve was already running on port %d; port %d was not applied", actual_port, port)
    serve.run(app, name=name, route_prefix=route_prefix, logging_config=ACCESS_LOG_OFF)
    proxy_url = f"http://{host}:{actual_port}{route_prefix.rstrip('/')}"
    if haproxy_ingress():
        log.info("serving at %s (HAProxy, balancing every replica)", proxy_url)
        return proxy_url
    direct = replica_urls(name, actual_port)
    if len(direct) == 1:  # direct ingress: the replica answers HTTP itself, one Python hop fewer
        log.info("serving at %s (the replica, direct ingress); through Serve's proxy at %s", direct[0], proxy_url)
        return f"{direct[0]}{route_prefix.rstrip('/')}"
    if direct:
        log.info("replicas answer directly at %s; Serve's proxy balances them at %s", ", ".join(direct), proxy_url)
    return proxy_url


def haproxy_ingress(environ=os.environ) -> bool:
    """Whether Serve's HTTP address is HAProxy (:mod:`kdray.ingress`): set where the node started."""
    from kdray.ingress import HAPROXY_ENV

    return environ.get(HAPROXY_ENV) == "1"


def _replicas_that_fit(num_cpus: float) -> int:
    """The autoscaling bound on a Ray that kdray started here: no more replicas than its CPUs can ever hold.

    Such a Ray has one node and no autoscaler, so a replica past that bound never starts; it only waits, and
    while it waits the running replica's tail latency grows (docs/architecture.md, "Measured choices"). On a
    cluster the bound stays
    :data:`serve.options.DEPLOYMENT`'s, because a waiting replica is what asks the cluster for a node."""
    import ray

    wanted = DEPLOYMENT.autoscaling.max_replicas
    total = float(ray.cluster_resources().get("CPU", 0.0))
    fit = fitting_replicas(total, num_cpus, wanted)
    if fit < wanted:
        log.info("this Ray (%.0f CPUs, started here) holds %d replica(s) of %.1f CPUs: autoscaling up to %d, not %d",
                 total, fit, num_cpus, fit, wanted)
    return fit


def fitting_replicas(total_cpus: float, cpus_per_replica: float, wanted: int) -> int:
    """At most ``wanted`` replicas, and no more than ``total_cpus`` hold (at least one)."""
    return max(1, min(int(wanted), int(total_cpus // cpus_per_replica) if cpus_per_replica > 0 else int(wanted)))


def _cpus_that_fit() -> float:
    """The replica's CPUs (serve.options) or, when fewer are free on this Ray, what is free (at least 0.5), so that
    the first replica starts on a small or busy machine. Further replicas ask for the same."""
    import ray

    wanted = DEPLOYMENT.num_cpus
    free = float(ray.available_resources().get("CPU", 0.0))
    if free >= wanted:
        return wanted
    fitted = max(0.5, math.floor(free * 2) / 2)
    log.info("a replica asks for %.1f CPUs; %.1f are free here, so it asks for %.1f", wanted, free, fitted)
    return fitted


def replica_urls(name: str, proxy_port: int, wait_s: float = 10.0) -> list[str]:
    """The HTTP addresses of the app's replicas when Serve runs with direct ingress
    (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` where the nodes start); else an empty list."""
    deadline = time.time() + (wait_s if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" else 0.0)
    while True:
        try:
            targets = ray_private.serve_http_targets(name)
        except Exception as exc:  # noqa: BLE001 - private API: the proxy URL still works
            log.info("cannot list the replicas' addresses (%s); using Serve's proxy", type(exc).__name__)
            return []
        urls = sorted({f"http://{ip}:{port}" for ip, port in targets if port != proxy_port})
        if urls or time.time() >= deadline:
            return urls
        time.sleep(0.5)
