"""Prometheus metrics of a replica: the series, and their recording from the access middleware.

:class:`serve.access.Access` records each request exactly once (whichever of its two copies acts on it, so both
ingress paths count the same), and ``GET /metrics`` (:mod:`serve.app`) serves :data:`REGISTRY` in the text
exposition format. The registry is kdray's own, never ``prometheus_client``'s global one, which Ray's exporter
may use. Every series carries ``model`` (the model id, ``name:version@sha256:<12 hex>#variant``) and
``replica`` (Serve's replica id), so that series from different replicas never collide when aggregated.

Label values are bounded whatever a client sends: ``route`` is one of :data:`ROUTES` (a route template, never
the raw path), ``status`` a status class and ``code`` a status code of the server's own responses, and
``reason`` a refusal's reason code (``[a-z_]{1,40}``, at most :data:`MAX_REASONS` of them; anything else is
``other``).

Series:

* ``kdray_request_duration_seconds`` (histogram; ``route``, ``status`` class ``2xx``…): latency from the
  request's arrival at the access middleware to the end of its response; ``/metrics`` itself is left out.
* ``kdray_requests_total`` (``route``, ``code``); ``kdray_refusals_total`` (``reason``).
* ``kdray_requests_in_flight``: requests in the replica now (``/metrics`` left out).
* ``kdray_explanations_in_flight`` and ``kdray_explanations_total`` (images explained), read from the
  replica's :class:`serve.explaining.ExplainGate` when scraped.
* ``kdray_model_info`` = 1 (``name``, ``version``, ``digest``, ``backend``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kdray.pinning import digest_of
from serve.options import METRICS, MetricsOptions

ENV = {"enabled": "KDRAY_METRICS", "open": "KDRAY_METRICS_OPEN"}
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Seconds: from a refusal in a few milliseconds to the request timeout (60 s).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
METRICS_ROUTE, OTHER = "/metrics", "other"
#: Routes matched by the path's end (in front of Serve the path still carries the application's route prefix).
SUFFIX_ROUTES = ("/predict", "/v2/health/live", "/v2/health/ready", "/-/healthz", "/healthz", METRICS_ROUTE, "/v2")
MODEL_ROUTES = {"": "/v2/models/{model}", "infer": "/v2/models/{model}/infer", "ready": "/v2/models/{model}/ready"}
ROUTES = (*SUFFIX_ROUTES, *MODEL_ROUTES.values(), OTHER)
MAX_REASONS = 64
_REASON = re.compile(rb"[a-z_]{1,40}")
IDENTITY = ("model", "replica")

REGISTRY = CollectorRegistry()
DURATION = Histogram("kdray_request_duration_seconds", "Request latency at the replica, by route and status class",
                     (*IDENTITY, "route", "status"), buckets=BUCKETS, registry=REGISTRY)
REQUESTS = Counter("kdray_requests", "Requests answered, by route and status code", (*IDENTITY, "route", "code"),
                   registry=REGISTRY)
REFUSALS = Counter("kdray_refusals", "Refusals, by reason code (x-kdray-reason)", (*IDENTITY, "reason"),
                   registry=REGISTRY)
IN_FLIGHT = Gauge("kdray_requests_in_flight", "Requests in this replica now", IDENTITY, registry=REGISTRY)
MODEL_INFO = Gauge("kdray_model_info", "The model this replica serves (always 1)",
                   (*IDENTITY, "name", "version", "digest", "backend"), registry=REGISTRY)


@dataclasses.dataclass
class _Served:
    identity: tuple[str, str] = ("unknown", f"{socket.gethostname()}:{os.getpid()}")
    explaining: object | None = None  # the replica's ExplainGate (in_flight, explained)
    children: dict = dataclasses.field(default_factory=dict)  # (route, status) -> (histogram, counter) children
    reasons: dict = dataclasses.field(default_factory=dict)  # reason bytes -> refusal counter child
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_served = _Served()


def serving(model: str, replica: str, name: str, version: str, backend: str, explaining=None) -> None:
    """Name what this process serves (the replica calls it once loaded): the labels of every series after it."""
    with _served.lock:
        _served.identity = (model, replica)
        _served.explaining = explaining
        _served.children.clear()
        _served.reasons.clear()
    MODEL_INFO.labels(model, replica, name, version, digest_of(model), backend).set(1)


def route_of(path: str) -> str:
    """The route template of a request path (one of :data:`ROUTES`): never a value a client chose."""
    head, found, tail = path.rpartition("/v2/models/")
    if found:
        model, _, action = tail.partition("/")
        return MODEL_ROUTES.get(action, OTHER) if model and "/" not in action else OTHER
    return next((route for route in SUFFIX_ROUTES if path.endswith(route)), OTHER)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Tracked:
    """One request being answered: counted in flight until :meth:`end`, which records it."""

    __slots__ = ("route", "started", "gauge")

    def __init__(self, path: str):
        self.route, self.started = route_of(path), time.perf_counter()
        self.gauge = None if self.route == METRICS_ROUTE else IN_FLIGHT.labels(*_served.identity)
        if self.gauge is not None:
            self.gauge.inc()

    def end(self, status: int | None, reason: bytes | None) -> None:
        seconds = time.perf_counter() - self.started
        if self.gauge is not None:
            self.gauge.dec()
        status = status if status is not None and 100 <= status <= 599 else 500
        key = (self.route, status)
        if (series := _served.children.get(key)) is None:
            timed = self.route != METRICS_ROUTE
            with _served.lock:
                series = _served.children.setdefault(key, (
                    DURATION.labels(*_served.identity, self.route, status_class(status)) if timed else None,
                    REQUESTS.labels(*_served.identity, self.route, str(status))))
        if series[0] is not None:
            series[0].observe(seconds)
        series[1].inc()
        if reason is not None:
            _refusal(reason).inc()


def _refusal(reason: bytes):
    """The refusal counter of a reason code; ``other`` for one not of kdray's form or past :data:`MAX_REASONS`."""
    if (child := _served.reasons.get(reason)) is not None:
        return child
    with _served.lock:
        known = _REASON.fullmatch(reason) and len(_served.reasons) < MAX_REASONS
        label = reason.decode() if known else OTHER
        child = REFUSALS.labels(*_served.identity, label)
        if known:
            _served.reasons[reason] = child
        return child


class _Explanations:
    """The replica's explanation gate, read when scraped (nothing to record per request)."""

    def describe(self):
        return self._families()

    def collect(self):
        gate = _served.explaining
        in_flight, total = self._families()
        if gate is not None:
            in_flight.add_metric(_served.identity, gate.in_flight)
            total.add_metric(_served.identity, gate.explained)
        return [in_flight, total]

    @staticmethod
    def _families():
        return [GaugeMetricFamily("kdray_explanations_in_flight", "Explanation requests in this replica now",
                                  labels=IDENTITY),
                CounterMetricFamily("kdray_explanations", "Images explained (Grad-CAM) by this replica",
                                    labels=IDENTITY)]


REGISTRY.register(_Explanations())


def exposition() -> bytes:
    """The registry in Prometheus' text format (:data:`CONTENT_TYPE`)."""
    return generate_latest(REGISTRY)


def options_from_env(environ=os.environ, base: MetricsOptions = METRICS) -> MetricsOptions:
    """``base`` with what the environment sets (the replica's runtime env; see :func:`env_of`)."""
    changes = {field: value for field, name in ENV.items() if (value := environ.get(name, "").strip())}
    return dataclasses.replace(base, **changes)


def env_of(options: MetricsOptions) -> dict[str, str]:
    """The environment variables that make every replica use ``options`` (:func:`options_from_env`)."""
    return {ENV[field]: "1" if getattr(options, field) else "0" for field in ENV}


@functools.cache
def process_options() -> MetricsOptions:
    """This process's options, read once."""
    return options_from_env()
