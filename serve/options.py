"""The one source of the serving knobs: batching, request limits, overload behaviour and autoscaling.

Each group is a frozen pydantic dataclass (checked like the jobs' configs, :mod:`kdray.config`).
``serve/app.py`` builds its deployment from :data:`DEPLOYMENT` and its batcher from :data:`BATCHING`.
``serve/config.yaml`` and the KubeRay RayService (``cluster/kuberay/rayservice-student.yaml``) do not repeat
these knobs: a Serve config overrides a deployment field by field, so what they leave out comes from here.
They set only what differs per environment (replica bounds, CPUs per replica); ``tests/test_serve.py`` and
``tests/test_cluster.py`` fail if one of them sets a knob owned here.

Overload: a replica runs at most ``max_ongoing_requests`` at once; each caller (the HTTP proxy) queues at
most ``max_queued_requests`` more; past that, Serve answers at once ``503`` with ``Retry-After``
(``backpressure_config``) instead of letting latency grow without bound.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from kdray.config import CONFIG
from kdray.images import SERVING_LIMITS

#: Serve's HTTP callback: a replica's direct-ingress server calls it for extra (outermost) middlewares. Set in
#: the replica's runtime env below, it installs kdray's admission gate in front of Serve (serve/admission.py).
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.admission:replica_middlewares"


@dataclass(frozen=True, config=CONFIG)
class BatchingOptions:
    """Batching of the replica: ``enabled`` is ``"auto"`` (on when the model runs on a GPU), True or False.

    On a CPU it does not pay here: MobileNetV2 int8 costs about the same core time per image at batch 32 as at
    batch 1, and the batcher's hops cost more than it saves (docs/architecture.md, "Measured choices"). When
    on: at most ``max_batch_size`` images per model call; a batch closes ``batch_wait_timeout_s`` after its
    first image arrives (images that arrive while a batch runs join the next one anyway)."""

    enabled: Literal["auto"] | bool = "auto"
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.002, ge=0)


BATCHING = BatchingOptions()

#: What each image of a request may be and cost (kdray.images): the serving decode budget is half of scoring's,
#: since a replica decodes WORKER_THREADS images at once beside its model and explanations.
IMAGE_LIMITS = SERVING_LIMITS

#: Bytes a request body may have (checked from Content-Length before reading; chunked bodies as they stream):
#: one image at the size limit, and room for a multipart envelope around it.
MAX_BODY_BYTES = IMAGE_LIMITS.max_bytes + 2**20

#: Threads per replica that decode (and, on a CPU, classify) images off the event loop, each one image at a
#: time with single-threaded inference.
WORKER_THREADS = 2


@dataclass(frozen=True, config=CONFIG)
class AdmissionOptions:
    """Admission control in each replica (serve/admission.py): at most ``limit`` inference requests (POST
    /predict, /v2/models/.../infer) at once; the excess is held ``hold_s`` and answered 503 + Retry-After.
    It runs in front of Serve's direct-ingress entry point (the replica's runtime env below) and, as a
    fallback, inside the FastAPI app. ``KDRAY_ADMISSION_LIMIT`` in a replica's environment overrides ``limit``."""

    limit: int = Field(64, ge=1)
    hold_s: float = Field(0.025, ge=0)
    prefixes: tuple[str, ...] = ("/predict", "/v2/models")


ADMISSION = AdmissionOptions()

#: The replica's GIL switch interval: pool threads decoding and classifying hand the GIL back to the event loop
#: (which answers, admits and refuses requests) at least this often (Python's default is 5 ms).
SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True, config=CONFIG)
class BackpressureOptions:
    status_code: int = 503
    retry_after_s: float = Field(1, gt=0)


@dataclass(frozen=True, config=CONFIG)
class AutoscalingOptions:
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)


@dataclass(frozen=True, config=CONFIG)
class DeploymentOptions:
    """The deployment options owned here (``@serve.deployment(**DEPLOYMENT.serve_options())``).

    Serve's own limits sit above the admission limit: with direct ingress, requests over ``max_ongoing_requests``
    queue in Serve before kdray's admission sees them, and Serve's 503 comes at once (a retry storm from clients
    that ignore Retry-After); the admission hold paces them instead."""

    max_ongoing_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    backpressure: BackpressureOptions = Field(default_factory=BackpressureOptions)
    autoscaling: AutoscalingOptions = Field(default_factory=AutoscalingOptions)
    # As many CPUs as the replica keeps threads busy, so that a new replica goes only where CPUs are free
    # (what a fractional CPU did instead: docs/serving.md). serve.app.deploy fits it to the CPUs free.
    num_cpus: float = Field(float(WORKER_THREADS), gt=0)
    # The replica's own environment names kdray's admission as Serve's HTTP callback, so that its direct-ingress
    # server refuses excess requests before Serve's entry point (serve/admission.py); Serve merges these
    # env_vars with the application's runtime_env.
    env_vars: dict[str, str] = Field(default_factory=lambda: {CALLBACK_ENV: CALLBACK})

    def serve_options(self) -> dict:
        """The keyword arguments of ``serve.deployment``: a new dict each call, the caller's to change."""
        return {"max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests,
                "backpressure_config": dataclasses.asdict(self.backpressure),
                "autoscaling_config": dataclasses.asdict(self.autoscaling),
                "ray_actor_options": {"num_cpus": self.num_cpus, "runtime_env": {"env_vars": dict(self.env_vars)}}}


DEPLOYMENT = DeploymentOptions()

#: Keys of a deployment that only this module sets (config files may set the others).
OWNED_KEYS = ("max_ongoing_requests", "max_queued_requests", "backpressure_config")


@dataclass(frozen=True, config=CONFIG)
class ExplainOptions:
    """Grad-CAM explanations (``?explain=true``, the OIP ``explain`` parameter; serve/explaining.py): each replica
    runs at most ``max_in_flight`` explanation requests at once, one at a time in one thread of ``threads``
    torch threads, beside the prediction pool; the excess is answered 503 + Retry-After (reason
    ``explain_busy``) at once, so explanations never queue in front of predictions. The explanation thread
    runs at Linux niceness ``nice`` (per thread): it gets the CPU that predictions leave idle, and little more."""

    max_in_flight: int = Field(2, ge=1)
    threads: int = Field(1, ge=1)
    nice: int = Field(19, ge=0, le=19)


EXPLAIN = ExplainOptions()


@dataclass(frozen=True, config=CONFIG)
class AccessOptions:
    """Who may call a replica, and its audit trail (serve/auth.py, serve/access.py).

    ``tokens_file``: one bearer token a line (a mounted Kubernetes Secret works); when set, every route but
    ``open_paths`` needs ``Authorization: Bearer <token>`` (401 otherwise); unset, there is no authentication.
    ``allowed_origins``: browser origins that may call (CORS); a request with any other ``Origin`` is refused
    403, since a cross-site multipart POST needs no preflight (the server's own pages pass: serve/auth.py). ``allowed_hosts``: the Host names served (empty:
    any); another Host gets 421 (DNS rebinding). ``log``: one JSON line per request on the ``kdray.access``
    logger (``<Ray logs dir>/serve/kdray_access_<pid>.jsonl`` in a replica). Each replica reads them from its environment (``KDRAY_AUTH_TOKENS_FILE``,
    ``KDRAY_ALLOWED_ORIGINS``, ``KDRAY_ALLOWED_HOSTS``: comma-separated; ``KDRAY_ACCESS_LOG``: 1/0), which
    ``serve.app.build_app`` sets for all replicas from these options."""

    tokens_file: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    log: bool = True
    # Liveness, kdray's and Serve's (a replica's own /-/healthz: what HAProxy ingress checks): no work, no data.
    # Readiness too, for probes that carry no token: it tells only ready or not, and costs at most one probe
    # inference a second per replica whoever asks (serve/readiness.py keeps each outcome a second).
    open_paths: tuple[str, ...] = ("/v2/health/live", "/v2/health/ready", "/-/healthz")
    min_token_chars: int = Field(16, ge=1)
    max_request_id_chars: int = Field(64, ge=8)
    # The log file rotates as Ray's own logs do (RAY_ROTATION_MAX_BYTES, RAY_ROTATION_BACKUP_COUNT defaults).
    log_max_bytes: int = Field(512 * 2**20, ge=2**20)
    log_backups: int = Field(5, ge=1)


ACCESS = AccessOptions()


@dataclass(frozen=True, config=CONFIG)
class MetricsOptions:
    """Each replica's Prometheus metrics (serve/metrics.py): ``enabled`` records them from the access middleware
    and serves ``GET /metrics``; off, neither happens (the route answers 404). ``open``: ``/metrics`` needs no
    bearer token even when authentication is on (the Host check and the rest of the guard are skipped for it
    too, as for liveness). Each replica reads them from its environment (``KDRAY_METRICS``,
    ``KDRAY_METRICS_OPEN``: 1/0), which ``serve.app.build_app`` sets for all replicas from these options."""

    enabled: bool = True
    open: bool = False


METRICS = MetricsOptions()


@dataclass(frozen=True, config=CONFIG)
class ReadinessOptions:
    """Readiness (``/v2/health/ready``, ``/v2/models/{model}/ready``; serve/readiness.py): one tiny inference
    through the serving path, answered 503 ``ready_timeout`` when it takes more than ``timeout_s``; its
    outcome is kept ``cache_s``, and at most one probe inference runs at a time per replica, so a flood of
    probes costs at most one inference per ``cache_s``."""

    timeout_s: float = Field(2, gt=0)
    cache_s: float = Field(1, ge=0)


READINESS = ReadinessOptions()


@dataclass(frozen=True, config=CONFIG)
class RequestOptions:
    """What one inference request may ask for and how long it may take (serve/deadline.py, serve/oip.py,
    serve/handler.py), so that one client cannot take a replica's memory, CPU or admission slots.

    * ``max_images``: images in one Open Inference Protocol request, counted from the tensor's shape before
      any of them is decoded (400 ``too_many_images``); ``max_json_depth``: nesting of its JSON header (400
      ``json_too_deep``), checked before it is parsed.
    * ``max_explain_images``: images being explained at once on a replica (about 93 MB each at 224 px); a
      request that asks for more is refused outright (400 ``too_many_images``), one that does not fit now
      gets 503 ``explain_busy``.
    * ``max_decode_bytes``: the decode budget of a request's images together (each one still has the per-image
      budget of IMAGE_LIMITS); once spent, the rest are not decoded (400 ``request_decode_budget``).
    * ``body_timeout_s``: time to receive the whole body, before an admission slot is taken (408
      ``body_timeout``); ``max_receiving_bytes``: bytes of bodies still arriving that a replica holds at once
      (past that, 503 ``busy_receiving`` + Retry-After: bodies that never finish cannot fill its memory);
      ``request_timeout_s``: time from the body's arrival to the response's start (503 ``request_timeout`` +
      Retry-After: the replica is too busy to answer in time)."""

    max_images: int = Field(64, ge=1)
    max_json_depth: int = Field(32, ge=4)
    max_explain_images: int = Field(8, ge=1)
    max_decode_bytes: int = Field(4 * IMAGE_LIMITS.max_decode_bytes, gt=0)
    body_timeout_s: float = Field(60, gt=0)
    max_receiving_bytes: int = Field(2**30, gt=0)
    request_timeout_s: float = Field(60, gt=0)


REQUEST = RequestOptions()
