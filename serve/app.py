"""The Serve transport: HTTP routes over the model handler (:mod:`serve.handler`), as one Serve deployment.

Endpoints (route prefix ``/``):

* ``POST /predict`` — the image as the raw body (``image/png``, ``image/jpeg``, ``application/dicom``,
  ``application/octet-stream``, ...) or as multipart field ``file`` →
  ``{"label", "probabilities": {class: p}, "covid_suspect": bool|null, "model_id", "backend"}``; with
  ``Accept: application/dicom`` and a DICOM body, the instance's DICOM SR (:mod:`kdray.dicom_results`; 406
  ``not_dicom`` for a body that is not DICOM, 400 ``bad_dicom_header`` for a header no SR can copy).
  400 ``{"detail", "reason"}`` = refused image, with the shared loader's reason code (``too_small``,
  ``too_large``, ``not_an_image``, ``unsupported_dicom``, ...); 413 = body over the limit; 415 = a content
  type that is not an image; 408 = the body did not arrive in time; 503 + ``Retry-After`` = overloaded
  (kdray's admission gate or Serve's backpressure) or not answered in time (``request_timeout``).
* Open Inference Protocol v2 (KServe / Triton REST; :mod:`serve.oip`): ``GET /v2``, ``/v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/{model}``, ``/v2/models/{model}/ready``; ``POST
  /v2/models/{model}/infer`` with a BYTES tensor ``image`` of encoded files, JSON (base64) or binary.
  Liveness does no model work; readiness runs one tiny inference (:mod:`serve.readiness`): 200
  ``{"ready": true}`` or 503 ``{"ready": false, "reason"}`` (``not_ready``, ``ready_timeout``). Serve's
  replica health check (:meth:`StudentClassifier.check_health`) asks the same probe.
* ``GET /healthz`` — model identity plus this replica's counters (model calls, images).
* ``GET /metrics`` — this replica's Prometheus metrics (:mod:`serve.metrics`); 404 with ``KDRAY_METRICS=0``.
* ``GET /`` — the viewer to a browser (:mod:`serve.viewer`: drop an X-ray, see the label, the probabilities
  and the Grad-CAM overlay), the JSON index of the routes to anything else; ``GET /model`` — the model card's
  essentials; ``GET /docs`` — OpenAPI UI; ``GET /openapi.json``.

What a request may be and cost is bounded in front of the routes (:func:`serve.admission.guard_middlewares`):
the body limit (:mod:`serve.body_limit`), the body deadline and request timeout (:mod:`serve.deadline`) and
the admission gate (:mod:`serve.admission`); in the routes, images per request and the decode budget
(:mod:`serve.handler`, :mod:`serve.oip`); every knob is in :mod:`serve.options`.

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` where the Ray nodes start (kdray's local Ray,
``cluster/local_head.sh`` and the KubeRay pods set it), each replica also answers HTTP on its own port
(30000 and up): :func:`serve.deploy.deploy` returns that address when there is one replica. Serve's proxy
keeps serving the same routes and balances all replicas.

Run it:

* ``serve run serve.app:app_builder model_dir=runs/pipeline/export/student [backend=onnx-int8]``
* ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``
* from Python: ``serve.deploy.deploy(model_dir, port=8000)`` → base URL (used by the pipeline job and tests).
"""

import dataclasses
import logging
import math
import os
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from kdray import KdrayError
from kdray.dicom_results import NotADicomSource, SourceHeaderRefused
from kdray.images import ImageRefused
from kdray.pinning import ModelRef, parse_ref
from kdray.predictor import BACKENDS
from serve import access, metrics, oip, viewer
from serve.admission import LIMIT_ENV, front_gate_missing, guard_middlewares
from serve.explaining import ExplainBusy, ExplainTooLarge, ExplainUnavailable, explain_flag
from serve.handler import DecodeBudgetSpent, StudentHandler, runs_on_gpu
from serve.options import ACCESS, BATCHING, DEPLOYMENT, READINESS, SWITCH_INTERVAL_S, AccessOptions, MetricsOptions
from serve.readiness import Readiness
from serve.refusal import retry_after
from serve.schemas import Health, ModelCardOut, Prediction, Refusal

log = logging.getLogger(__name__)

APP_NAME = "kdray"
ACCESS_LOG_OFF = {"enable_access_log": False}  # Serve's own; kdray's is serve/access.py
REASON = access.REASON_HEADER.decode()
DICOM_TYPES = ("application/dicom", "image/dicom")
RAW_TYPES = ("application/octet-stream",) + DICOM_TYPES

fastapi_app = FastAPI(
    title="kdray student classifier",
    description="Chest X-ray classification by the distilled MobileNetV2 student (kdray). "
                "POST an image (PNG, JPEG, DICOM, ...) to /predict, or use the Open Inference Protocol v2 "
                "routes under /v2.",
    version="2",
)
for _guard in reversed(guard_middlewares("app")):  # add_middleware puts each outside the ones before it
    fastapi_app.add_middleware(_guard.cls, *_guard.args, **_guard.kwargs)
# Outermost (added last): the request id, authentication and the access log see every request and refusal.
fastapi_app.add_middleware(access.Access, layer="app")


def replica_cpus() -> int:
    """The CPUs Ray assigned to this process, rounded up, at least 1."""
    try:
        import ray

        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = 0.0
    return max(1, math.ceil(cpus))


def replica_name() -> str:
    """Serve's id of this replica (the ``replica`` label of its metrics); outside Serve, host and pid."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"


def _media_type(content_type: str | None) -> str:
    return (content_type or "application/octet-stream").split(";", 1)[0].strip().lower()


def _with_reason(headers: dict | None, reason: str) -> dict:
    """The refusal's headers with its reason code (``x-kdray-reason``), which the access log records."""
    return {**(headers or {}), REASON: reason}


def _refusal(status: int, reason: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "reason": reason}, status_code=status,
                        headers=_with_reason(headers, reason))


def _oip_error(message: str, status: int = 400, headers: dict | None = None,
               reason: str = oip.INVALID) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status,
                        headers=_with_reason(headers, reason))


def _retry_later() -> dict[str, str]:
    name, value = retry_after(DEPLOYMENT.backpressure.retry_after_s)
    return {name.decode(): value.decode()}


def accepts_dicom(accept: str | None) -> bool:
    """Whether an Accept header asks for ``application/dicom`` (with a non-zero q): the answer is then the SR."""
    for media_range in (accept or "").lower().split(","):
        media, *params = (part.strip() for part in media_range.split(";"))
        if media in DICOM_TYPES:
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


async def _image_body(request: Request) -> bytes | JSONResponse:
    """The image a /predict request carries (raw body or multipart field ``file``), or the refusal."""
    media = _media_type(request.headers.get("content-type"))
    if media == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _refusal(422, "no_file", "multipart upload has no file field 'file'")
        return await upload.read()
    if media.startswith("image/") or media in RAW_TYPES:
        return await request.body()
    return _refusal(415, "unsupported_media_type",
                    f"unsupported content type {media[:80]}: send the image itself (image/png, image/jpeg, "
                    "application/dicom, application/octet-stream) or multipart field 'file'")


@serve.deployment(**DEPLOYMENT.serve_options())
@serve.ingress(fastapi_app)
class StudentClassifier:
    """One replica: the routes, over one :class:`serve.handler.StudentHandler`."""

    def __init__(self, model_dir: str, backend: str = "auto", threads: int | None = None,
                 batching: str | bool = BATCHING.enabled):
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        access.process_settings()  # a tokens file that cannot be used fails the replica, never turns auth off
        # On a CPU each request is decoded and classified in one pass by a pool thread, single-threaded:
        # batching does not pay there (docs/architecture.md, "Measured choices"). On a GPU images are decoded in
        # the pool and batched (@serve.batch), with the replica's CPUs for the batch.
        batched = runs_on_gpu(model_dir, backend) if batching == "auto" else bool(batching)
        threads = max(1, int(threads)) if threads else (replica_cpus() if batched else 1)
        self.handler = StudentHandler(model_dir, backend, threads, batched)
        if batched:
            self.handler.batch_classifier = self.classify
        if missing := front_gate_missing():
            log.warning("front admission gate off: %s", missing)
        predictor = self.handler.predictor
        access.serving(predictor.model_id)
        metrics.serving(predictor.model_id, replica_name(), self.handler.model_name, self.handler.model_version,
                        predictor.backend, self.handler.explaining)
        self.readiness = Readiness(self.handler.probe, READINESS.timeout_s, READINESS.cache_s)
        log.info("kdray student %s (%s, %d threads, batching %s) ready", predictor.model_id, predictor.backend,
                 threads, "on" if batched else "off")

    @serve.batch(max_batch_size=BATCHING.max_batch_size, batch_wait_timeout_s=BATCHING.batch_wait_timeout_s)
    async def classify(self, images: list) -> list:
        """One model call per batch (GPU path).

        Deliberately blocking (no asyncio.to_thread): serve.batch does not await a batch before forming the
        next one, so with inference in a thread each next batch held only the requests of a few milliseconds;
        blocking the loop lets every request that arrives meanwhile join the next batch (docs/architecture.md,
        "Measured choices"). With RAY_SERVE_THROUGHPUT_OPTIMIZED (kdray's node default) the user code shares
        Serve's loop, so the replica's HTTP server and admission gate also wait for the batch."""
        return self.handler.classify_batch(images)

    # -- HTTP: /predict
    @fastapi_app.post("/predict", response_model=Prediction, response_model_exclude_unset=True,
                      responses={400: {"model": Refusal, "description": "the image was refused (reason code)"},
                                 413: {"model": Refusal, "description": "body over the size limit"},
                                 406: {"model": Refusal, "description": "Accept: application/dicom for a body "
                                                                        "that is not DICOM (reason not_dicom)"},
                                 415: {"model": Refusal, "description": "not an image content type"},
                                 503: {"description": "overloaded; retry after the Retry-After header's seconds"}},
                      openapi_extra={"requestBody": {"content": {
                          "image/png": {"schema": {"type": "string", "format": "binary"}},
                          "application/dicom": {"schema": {"type": "string", "format": "binary"}},
                          "multipart/form-data": {"schema": {"type": "object", "properties": {
                              "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
    async def predict(self, request: Request):
        """``?explain=true`` adds a Grad-CAM overlay of the predicted class (at most EXPLAIN.max_in_flight
        such requests per replica at once; the excess gets 503 + Retry-After, reason ``explain_busy``)."""
        try:
            explain = explain_flag(request.query_params.get("explain"))
        except ValueError as exc:
            return _refusal(400, "bad_parameter", str(exc))
        data = await _image_body(request)
        if isinstance(data, JSONResponse):
            return data
        as_dicom = accepts_dicom(request.headers.get("accept"))
        if as_dicom and explain:
            return _refusal(400, "bad_parameter", "explain=true answers JSON only: leave it out to get the SR "
                                                  "(Accept: application/dicom), or accept application/json")
        try:
            if as_dicom:
                return Response(await self.handler.structured_report(data), media_type=DICOM_TYPES[0])
            prediction = await self.handler.predict(data, explain)
        except NotADicomSource as exc:
            return _refusal(406, exc.reason, str(exc))
        except (ImageRefused, DecodeBudgetSpent, ExplainTooLarge, SourceHeaderRefused) as exc:
            return _refusal(400, exc.reason, str(exc))
        except ExplainBusy as exc:
            return _refusal(503, "explain_busy", str(exc), _retry_later())
        except ExplainUnavailable as exc:
            return _refusal(501, "explain_unavailable", str(exc))
        return prediction.model_dump(exclude_unset=True)

    # -- HTTP: Open Inference Protocol v2
    @fastapi_app.get("/v2")
    async def oip_server(self) -> dict:
        return self.handler.server_metadata()

    @fastapi_app.get("/v2/health/live")
    async def oip_live(self) -> dict:
        return {"live": True}

    @fastapi_app.get("/v2/health/ready")
    async def oip_ready(self):
        return await self._ready({})

    @fastapi_app.get("/v2/models/{model}")
    async def oip_model(self, model: str):
        return self.handler.model_metadata() if self.handler.knows_model(model) else self._unknown_model(model)

    @fastapi_app.get("/v2/models/{model}/ready")
    async def oip_model_ready(self, model: str):
        return await self._ready({"name": model}) if self.handler.knows_model(model) else self._unknown_model(model)

    @fastapi_app.post("/v2/models/{model}/infer")
    async def oip_infer(self, model: str, request: Request):
        if not self.handler.knows_model(model):
            return self._unknown_model(model)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            return _oip_error("compressed request bodies are not supported: send it uncompressed", 415)
        try:
            infer = await self.handler.parse_infer(await request.body(), request.headers.get(oip.HEADER_LENGTH))
            body, headers = await self.handler.infer(infer)
        except oip.OipError as exc:
            return _oip_error(str(exc), reason=exc.reason)
        except ExplainBusy as exc:
            return _oip_error(str(exc), 503, _retry_later(), "explain_busy")
        except ExplainTooLarge as exc:
            return _oip_error(str(exc), reason=exc.reason)
        except ExplainUnavailable as exc:
            return _oip_error(str(exc), 501)
        return Response(body, headers={k: v for k, v in headers.items() if k != "content-type"},
                        media_type=headers["content-type"])

    def _unknown_model(self, model: str) -> JSONResponse:
        return _oip_error(self.handler.unknown_model(model), 404)

    async def _ready(self, body: dict):
        """200 ``{..., "ready": true}`` when the readiness probe passes, else 503 with its reason."""
        reason = await self.readiness.check()
        if reason is None:
            return {**body, "ready": True}
        return JSONResponse({**body, "ready": False, "reason": reason}, status_code=503,
                            headers=_with_reason(_retry_later(), reason))

    async def check_health(self) -> None:
        """Serve's replica health check (every 10 s; three failures in a row restart the replica): the readiness
        probe with no timeout of its own, so that a busy replica, whose probe waits its turn in the pool, is not
        restarted, while a model that fails, or hangs past Serve's 30 s health-check timeout, is."""
        if reason := await self.readiness.check(bounded=False):
            raise RuntimeError(f"kdray readiness probe: {reason}")

    # -- HTTP: health and index
    @fastapi_app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return self.handler.health()

    @fastapi_app.get("/", response_model=None)
    async def index(self, request: Request) -> dict | Response:
        """The viewer to a browser (``Accept: text/html``), the JSON index of the routes to anything else."""
        if viewer.wants_page(request.headers.get("accept")):
            return self._viewer_file("/")
        return self.handler.index()

    @fastapi_app.get("/viewer.css", include_in_schema=False)
    async def viewer_css(self) -> Response:
        return self._viewer_file("/viewer.css")

    @fastapi_app.get("/viewer.js", include_in_schema=False)
    async def viewer_js(self) -> Response:
        return self._viewer_file("/viewer.js")

    def _viewer_file(self, path: str) -> Response:
        body, media_type = viewer.FILES[path]
        return Response(body, media_type=media_type, headers=viewer.HEADERS)

    @fastapi_app.get("/model", response_model=ModelCardOut)
    async def model_card(self) -> ModelCardOut:
        """The model card's essentials: identity, the covid threshold and what it was fitted for, intended use,
        known biases (the viewer shows them)."""
        return self.handler.card

    @fastapi_app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(self) -> Response:
        """This replica's series (each replica exposes its own; see docs/serving.md)."""
        if not metrics.process_options().enabled:
            return _refusal(404, "metrics_off", "metrics are off on this replica (KDRAY_METRICS=0)")
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


# -- building the application

def access_args(args: dict) -> AccessOptions | None:
    """:class:`serve.options.AccessOptions` from app_builder's arguments (popped from ``args``), None when none."""
    names = {"auth_tokens_file": "tokens_file", "allowed_origins": "allowed_origins",
             "allowed_hosts": "allowed_hosts", "access_log": "log"}
    given = {field: args.pop(arg) for arg, field in names.items() if arg in args}
    if not given:
        return None
    for field in ("allowed_origins", "allowed_hosts"):
        if isinstance(given.get(field), str):
            given[field] = tuple(v.strip() for v in given[field].split(",") if v.strip())
    try:
        return dataclasses.replace(ACCESS, **given)
    except ValidationError as exc:
        error = exc.errors()[0]
        arg = next((a for a, f in names.items() if f == error["loc"][-1]), error["loc"][-1])
        raise KdrayError(f"serve.app:app_builder: bad {arg}: {error['msg']}") from None


def _resolve_model_dir(model_dir: str) -> str:
    """Local paths become absolute (replicas may not share the caller's cwd) and must exist; a pinned reference
    (``<folder>@sha256:<digest>``) keeps its pin, which every replica checks when it loads."""
    ref = parse_ref(model_dir)
    model_dir = ref.uri
    if model_dir.startswith("file://"):
        model_dir = model_dir[len("file://"):]
    if "://" in model_dir:  # s3://…: checked by the replica when it loads
        return str(ModelRef(model_dir, ref.digest))
    path = os.path.abspath(os.path.expanduser(model_dir))
    if not os.path.isdir(path):
        raise KdrayError(f"model_dir {model_dir!r} (resolved to {path}) is not a folder: pass an exported model "
                         "folder (metadata.json) or a training checkpoint")
    return str(ModelRef(path, ref.digest))


def deployment_options(max_replicas: int | None = None, num_cpus: float | None = None,
                       admission_limit: int | None = None, access_options: AccessOptions | None = None,
                       metrics_options: MetricsOptions | None = None, **overrides) -> dict:
    """:data:`serve.options.DEPLOYMENT` with the environment's replica bound and CPUs per replica applied
    (and, for tests and benchmarks, another admission limit: ``KDRAY_ADMISSION_LIMIT`` in the replica).
    ``access_options`` (authentication, allow-lists, access log) and ``metrics_options`` go to every replica's
    environment."""
    options = DEPLOYMENT.serve_options()
    if max_replicas is not None:
        scaling = options["autoscaling_config"]
        scaling["max_replicas"] = int(max_replicas)
        scaling["min_replicas"] = min(scaling["min_replicas"], int(max_replicas))
    if num_cpus is not None:
        options["ray_actor_options"]["num_cpus"] = float(num_cpus)
    if admission_limit is not None:
        options["ray_actor_options"]["runtime_env"]["env_vars"][LIMIT_ENV] = str(int(admission_limit))
    if access_options is not None:
        options["ray_actor_options"]["runtime_env"]["env_vars"].update(access.env_of(access_options))
    if metrics_options is not None:
        options["ray_actor_options"]["runtime_env"]["env_vars"].update(metrics.env_of(metrics_options))
    options.update(overrides)
    return options


def build_app(model_dir: str, backend: str = "auto", threads: int | None = None,
              batching: str | bool = BATCHING.enabled,
              **deployment_overrides) -> Application:
    """The bound application; ``deployment_overrides`` go to :func:`deployment_options`.

    ``batching``: ``auto`` (on when the model runs on a GPU), ``on`` or ``off``."""
    if backend not in BACKENDS:
        raise KdrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    try:  # BatchingOptions reads it: auto, or a bool (true/false, on/off, 1/0, ...)
        enabled = dataclasses.replace(BATCHING, enabled=str(batching).lower()).enabled
    except ValidationError:
        raise KdrayError(f"unknown batching {batching!r}; choose auto, on or off") from None
    options = deployment_options(**deployment_overrides)
    deployment = StudentClassifier.options(**options) if options != DEPLOYMENT.serve_options() else StudentClassifier
    return deployment.bind(_resolve_model_dir(model_dir), backend, threads, enabled)


APP_ARGS = ("model_dir", "backend", "threads", "batching", "max_replicas", "num_cpus", "auth_tokens_file",
            "allowed_origins", "allowed_hosts", "access_log")


def app_builder(args: dict) -> Application:
    """Builder for ``serve run serve.app:app_builder model_dir=... [backend=...]`` and config files.

    ``max_replicas`` and ``num_cpus`` (per replica) are the environment's knobs (a KubeRay RayService sets
    them); ``auth_tokens_file``, ``allowed_origins`` / ``allowed_hosts`` (comma-separated) and ``access_log``
    (on/off) set :class:`serve.options.AccessOptions` for all replicas; everything else about the deployment
    comes from :mod:`serve.options`."""
    args = dict(args or {})
    model_dir = args.pop("model_dir", None)
    if not model_dir:
        raise KdrayError("serve.app:app_builder needs model_dir: an exported model folder or a training checkpoint, "
                         "e.g. `serve run serve.app:app_builder model_dir=runs/pipeline/export/student`, or "
                         "applications[].args.model_dir in a config file")
    backend = str(args.pop("backend", None) or "auto")
    threads = args.pop("threads", None)
    batching = args.pop("batching", BATCHING.enabled)
    environment = {}
    try:
        for key, kind in (("max_replicas", int), ("num_cpus", float)):
            if args.get(key) is not None:
                environment[key] = kind(args.pop(key))
    except (TypeError, ValueError):
        raise KdrayError("serve.app:app_builder: max_replicas must be an integer and num_cpus a number") from None
    if chosen := access_args(args):
        environment["access_options"] = chosen
    if args:
        raise KdrayError(f"serve.app:app_builder: unknown argument(s) {', '.join(sorted(args))}; "
                         f"expected {', '.join(APP_ARGS)}")
    return build_app(str(model_dir), backend, int(threads) if threads else None, batching, **environment)
