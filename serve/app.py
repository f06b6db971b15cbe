"""Ray Serve app: the distilled student behind a FastAPI ingress.

Endpoints (route prefix ``/``):

* ``POST /predict`` — the image as the raw body (``image/png``, ``image/jpeg``, ``application/dicom``,
  ``application/octet-stream``, ...) or as multipart field ``file`` →
  ``{"label", "probabilities": {class: p}, "covid_suspect": bool|null, "model_id", "backend"}``.
  400 ``{"detail", "reason"}`` = refused image, with the shared loader's reason code (``too_small``,
  ``too_large``, ``not_an_image``, ``unsupported_dicom``, ...); 413 = body over the limit; 415 = a content
  type that is not an image; 503 + ``Retry-After`` = overloaded (Serve's backpressure).
* Open Inference Protocol v2 (KServe / Triton REST; :mod:`serve.oip`): ``GET /v2``, ``/v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/{model}``, ``/v2/models/{model}/ready``; ``POST
  /v2/models/{model}/infer`` with a BYTES tensor ``image`` of encoded files, JSON (base64) or binary.
* ``GET /healthz`` — model identity plus this replica's counters (model calls, images).
* ``GET /`` — links; ``GET /docs`` — OpenAPI UI; ``GET /openapi.json``.

Each image goes through the shared loader (:func:`kdray.images.load_image`: PNG, JPEG, TIFF, BMP, WebP and
DICOM, judged by content) in a small thread pool, never on the event loop, so a bad upload fails alone. On a
CPU the same pool thread classifies it (single-threaded inference, no batching: it does not pay there); on a
GPU decoded images are grouped by ``@serve.batch``. Knobs: :mod:`serve.options`.

With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` where the Ray nodes start (kdray's local Ray,
``cluster/local_head.sh`` and the KubeRay pods set it), each replica also answers HTTP on its own port
(30000 and up): :func:`deploy` returns that address when there is one replica. Serve's proxy keeps
serving the same routes and balances all replicas.

Run it:

* ``serve run serve.app:app_builder model_dir=runs/pipeline/export/student [backend=onnx-int8]``
* ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``
* from Python: ``serve.app.deploy(model_dir, port=8000)`` → base URL (used by the pipeline job and tests).
"""

import asyncio
import copy
import logging
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from kdray import KdrayError
from kdray.images import ImageRefused, load_image
from kdray.predictor import BACKENDS, Predictor, is_export, model_info, read_model_card
from serve import oip
from serve.admission import LIMIT_ENV, Admission, admission_settings, front_gate_missing
from serve.body_limit import BodyLimit
from serve.explaining import ExplainBusy, ExplainGate, ExplainUnavailable, explain_flag
from serve.options import (BATCHING, DEPLOYMENT, EXPLAIN, IMAGE_LIMITS, MAX_BODY_BYTES, SWITCH_INTERVAL_S,
                           WORKER_THREADS)

log = logging.getLogger(__name__)

APP_NAME = "kdray"
DEFAULT_MODEL_NAME = "kdray-student"  # a training checkpoint served directly has no model card
ACCESS_LOG_OFF = {"enable_access_log": False}
DICOM_TYPES = ("application/dicom", "image/dicom")
RAW_TYPES = ("application/octet-stream",) + DICOM_TYPES


class ExplanationOut(BaseModel):
    explained_class: str = Field(description="the class the heat map explains: this prediction's label")
    torch_class: str = Field(description="the top class of the torch weights the heat map is computed on")
    agrees: bool = Field(description="explained_class == torch_class (false: the served artifact and the torch "
                                     "weights disagree on this image; the map still explains explained_class)")
    method: str
    layer: str
    size: int = Field(description="side of the heat map and the overlay: the model's input size")
    overlay_png: str = Field(description="base64 PNG: the Grad-CAM heat map over the image the model saw")


class Prediction(BaseModel):
    label: str = Field(description="most probable class")
    probabilities: dict[str, float] = Field(description="class → probability (sums to 1)")
    covid_suspect: bool | None = Field(description="P(covid) >= the model's stored threshold; "
                                                    "null when the model has no threshold")
    model_id: str
    backend: str
    explanation: ExplanationOut | None = Field(None, description="with ?explain=true only")


class Health(BaseModel):
    status: str
    model_id: str
    backend: str
    classes: list[str]
    image_size: int
    threads: int
    batching: bool = Field(description="images grouped into batches (on a GPU), else one image per call")
    batches: int = Field(description="batches this replica has run")
    batched_images: int = Field(description="images this replica has classified")
    max_batch_size_seen: int = Field(description="largest batch this replica has run")
    explained: int = Field(description="images this replica has explained (Grad-CAM)")
    explain_refused: int = Field(description="explanation requests refused 503 (too many in flight)")


class Refusal(BaseModel):
    detail: str
    reason: str = Field(description="stable reason code (too_small, too_large, not_an_image, unsupported_dicom, "
                                    "body_too_large, unsupported_media_type, ...)")


fastapi_app = FastAPI(
    title="kdray student classifier",
    description="Chest X-ray classification by the distilled MobileNetV2 student (kdray). "
                "POST an image (PNG, JPEG, DICOM, ...) to /predict, or use the Open Inference Protocol v2 "
                "routes under /v2.",
    version="2",
)
fastapi_app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
fastapi_app.add_middleware(Admission, **admission_settings("app"))


def replica_cpus() -> int:
    """The CPUs Ray assigned to this process, rounded up, at least 1."""
    try:
        import ray

        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = 0.0
    return max(1, math.ceil(cpus))


def _runs_on_gpu(model_dir: str, backend: str) -> bool:
    """Whether Predictor.load(model_dir, backend) will run on a GPU: the torch backend with CUDA present."""
    import torch

    return model_info(model_dir, backend).backend == "torch" and torch.cuda.is_available()


def _media_type(content_type: str | None) -> str:
    return (content_type or "application/octet-stream").split(";", 1)[0].strip().lower()


def _refusal(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "reason": reason}, status_code=status)


def _oip_error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _retry_later() -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(DEPLOYMENT["backpressure_config"]["retry_after_s"])))}


@serve.deployment(**DEPLOYMENT)
@serve.ingress(fastapi_app)
class StudentClassifier:
    """One replica: a loaded :class:`kdray.predictor.Predictor`, a decode pool and batching counters."""

    def __init__(self, model_dir: str, backend: str = "auto", threads: int | None = None,
                 batching: str | bool = BATCHING["enabled"]):
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        # On a CPU each request is decoded and classified in one pass by one of WORKER_THREADS pool threads,
        # single-threaded: batching does not pay there (docs/architecture.md, "Measured choices"). On a GPU
        # images are decoded in the pool and batched (@serve.batch), with the replica's CPUs for the batch.
        self.batching = _runs_on_gpu(model_dir, backend) if batching == "auto" else bool(batching)
        self.threads = max(1, int(threads)) if threads else (replica_cpus() if self.batching else 1)
        self.predictor = Predictor.load(model_dir, backend=backend, threads=self.threads)
        self.classes = list(self.predictor.classes)
        if is_export(model_dir):
            card = read_model_card(model_dir)
            self.model_name, self.model_version = card.name, card.version
        else:
            self.model_name, self.model_version = DEFAULT_MODEL_NAME, self.predictor.model_id
        self.pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="kdray-image")
        size = self.predictor.image_size
        # Warm-up: the first request should not pay for lazy initialisation, and a model that
        # cannot run should fail the replica's start, not its first user.
        self.predictor.probabilities(np.zeros((1, size, size), dtype=np.uint8))
        self.batches = self.batched_images = self.max_batch_size_seen = 0
        self.counting = threading.Lock()  # pool threads count concurrently
        self.explaining = ExplainGate(model_dir, **EXPLAIN)
        if missing := front_gate_missing():
            log.warning("front admission gate off: %s", missing)
        log.info("kdray student %s (%s, %d threads, batching %s) ready", self.predictor.model_id,
                 self.predictor.backend, self.threads, "on" if self.batching else "off")

    # -- classifying
    @serve.batch(max_batch_size=BATCHING["max_batch_size"], batch_wait_timeout_s=BATCHING["batch_wait_timeout_s"])
    async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for decoded uint8 [S, S] images: one ``probabilities`` call per batch (GPU path)."""
        # Deliberately blocking (no asyncio.to_thread). serve.batch does not await a batch before
        # forming the next one: it closes the next batch batch_wait_timeout_s after its first
        # arrival, then parks it until the running one is done. With inference in a thread, that
        # next batch is closed while this one runs and holds only the 1-2 requests that arrived in
        # those milliseconds (in tests/test_serve.py's burst every batch then held one image); blocking the loop
        # lets every request that arrives meanwhile join the next batch (larger batches:
        # docs/architecture.md, "Measured choices"). With RAY_SERVE_THROUGHPUT_OPTIMIZED (kdray's node
        # default) the user code shares Serve's loop, so the replica's HTTP server and admission gate
        # also wait for the batch: a few milliseconds on a GPU, the path that batches by default.
        probs = self.predictor.probabilities(np.stack(images))
        self._count(len(images))
        return list(probs)

    def _classify_now(self, data: bytes) -> np.ndarray:
        """Decode and classify one image in the calling (pool) thread (CPU path)."""
        return self._classify_keeping_pixels(data)[0]

    def _classify_keeping_pixels(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, decoded pixels) of one image, in the calling (pool) thread."""
        pixels = load_image(data, self.predictor.image_size, IMAGE_LIMITS).pixels
        probs = self.predictor.probabilities(pixels[None])[0]
        self._count(1)
        return probs, pixels

    async def _explained(self, images: list[bytes]) -> tuple[np.ndarray, list]:
        """(probabilities, explanations) for encoded images; the caller has admitted the request
        (:meth:`ExplainGate.admit`). Predictions are computed as without explain (same pool, same model)."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(self.pool, self._classify_keeping_pixels, d)
                                         for d in images))
        probs = np.stack([p for p, _ in results])
        explanations = await self.explaining.explain(np.stack([x for _, x in results]), list(probs.argmax(1)))
        return probs, explanations

    def _count(self, images: int) -> None:
        with self.counting:
            self.batches += 1
            self.batched_images += images
            self.max_batch_size_seen = max(self.max_batch_size_seen, images)

    async def _probabilities(self, data: bytes) -> np.ndarray:
        """Probabilities for one encoded image; raises ImageRefused. Decoding never runs on the event loop."""
        loop = asyncio.get_running_loop()
        if not self.batching:
            return await loop.run_in_executor(self.pool, self._classify_now, data)
        loaded = await loop.run_in_executor(self.pool, load_image, data, self.predictor.image_size, IMAGE_LIMITS)
        return await self.classify(loaded.pixels)

    def _response(self, probs: np.ndarray) -> dict:
        flags = self.predictor.covid_suspect(probs[None])
        suspect = None if flags is None else bool(flags[0])
        return {"label": self.classes[int(np.argmax(probs))],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "covid_suspect": suspect, "model_id": self.predictor.model_id, "backend": self.predictor.backend}

    # -- HTTP: /predict
    @fastapi_app.post("/predict", response_model=Prediction, response_model_exclude_unset=True,
                      responses={400: {"model": Refusal, "description": "the image was refused (reason code)"},
                                 413: {"model": Refusal, "description": "body over the size limit"},
                                 415: {"model": Refusal, "description": "not an image content type"},
                                 503: {"description": "overloaded; retry after the Retry-After header's seconds"}},
                      openapi_extra={"requestBody": {"content": {
                          "image/png": {"schema": {"type": "string", "format": "binary"}},
                          "application/dicom": {"schema": {"type": "string", "format": "binary"}},
                          "multipart/form-data": {"schema": {"type": "object", "properties": {
                              "file": {"type": "string", "format": "binary"}}, "required": ["file"]}}}}})
    async def predict(self, request: Request):
        """``?explain=true`` adds a Grad-CAM overlay of the predicted class (at most EXPLAIN["max_in_flight"]
        such requests per replica at once; the excess gets 503 + Retry-After, reason ``explain_busy``)."""
        try:
            explain = explain_flag(request.query_params.get("explain"))
        except ValueError as exc:
            return _refusal(400, "bad_parameter", str(exc))
        media = _media_type(request.headers.get("content-type"))
        if media == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                return _refusal(422, "no_file", "multipart upload has no file field 'file'")
            data = await upload.read()
        elif media.startswith("image/") or media in RAW_TYPES:
            data = await request.body()
        else:
            return _refusal(415, "unsupported_media_type",
                            f"unsupported content type {media[:80]}: send the image itself (image/png, image/jpeg, "
                            "application/dicom, application/octet-stream) or multipart field 'file'")
        if explain:
            return await self._predict_explained(data)
        try:
            probs = await self._probabilities(data)
        except ImageRefused as exc:
            return _refusal(400, exc.reason, str(exc))
        return self._response(probs)

    async def _predict_explained(self, data: bytes):
        try:
            self.explaining.admit()
        except ExplainBusy as exc:
            response = _refusal(503, "explain_busy", str(exc))
            response.headers.update(_retry_later())
            return response
        try:
            probs, explanations = await self._explained([data])
        except ImageRefused as exc:
            return _refusal(400, exc.reason, str(exc))
        except ExplainUnavailable as exc:
            return _refusal(501, "explain_unavailable", str(exc))
        finally:
            self.explaining.release()
        return {**self._response(probs[0]), "explanation": explanations[0].to_json()}

    # -- HTTP: Open Inference Protocol v2
    @fastapi_app.get("/v2")
    async def oip_server(self) -> dict:
        return oip.server_metadata(self.model_version)

    @fastapi_app.get("/v2/health/live")
    async def oip_live(self) -> dict:
        return {"live": True}

    @fastapi_app.get("/v2/health/ready")
    async def oip_ready(self) -> dict:
        return {"ready": True}

    @fastapi_app.get("/v2/models/{model}")
    async def oip_model(self, model: str):
        if model != self.model_name:
            return self._unknown_model(model)
        return oip.model_metadata(self.model_name, self.model_version, self.classes,
                                  oip.platform_of(self.predictor.backend))

    @fastapi_app.get("/v2/models/{model}/ready")
    async def oip_model_ready(self, model: str):
        return self._unknown_model(model) if model != self.model_name else {"name": model, "ready": True}

    @fastapi_app.post("/v2/models/{model}/infer")
    async def oip_infer(self, model: str, request: Request):
        if model != self.model_name:
            return self._unknown_model(model)
        if request.headers.get("content-encoding", "identity").lower() != "identity":
            return _oip_error("compressed request bodies are not supported: send it uncompressed", 415)
        try:
            infer = oip.parse_infer_request(await request.body(), request.headers.get(oip.HEADER_LENGTH))
        except oip.OipError as exc:
            return _oip_error(str(exc))
        if infer.explain:
            return await self._oip_explained(infer)
        results = await asyncio.gather(*(self._probabilities(d) for d in infer.images), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, ImageRefused):
                return _oip_error(f"{oip.INPUT_NAME}[{index}] refused ({result.reason}): {result}")
            if isinstance(result, BaseException):
                raise result
        return self._oip_response(infer, np.stack(results))

    async def _oip_explained(self, infer: oip.InferRequest):
        try:
            self.explaining.admit()
        except ExplainBusy as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers=_retry_later())
        try:
            probs, explanations = await self._explained(infer.images)
        except ImageRefused as exc:  # which image: the explain path decodes them together
            return _oip_error(f"{oip.INPUT_NAME} refused ({exc.reason}): {exc}")
        except ExplainUnavailable as exc:
            return _oip_error(str(exc), 501)
        finally:
            self.explaining.release()
        return self._oip_response(infer, probs, explanations)

    def _oip_response(self, infer: oip.InferRequest, probs: np.ndarray, explanations: list | None = None):
        labels = [self.classes[i] for i in probs.argmax(1)]
        body, headers = oip.encode_infer_response(self.model_name, self.model_version, infer, probs, labels,
                                                  explanations)
        return Response(body, headers={k: v for k, v in headers.items() if k != "content-type"},
                        media_type=headers["content-type"])

    def _unknown_model(self, model: str) -> JSONResponse:
        return _oip_error(f"unknown model {model[:80]!r}; this server serves {self.model_name!r}", 404)

    # -- HTTP: health and index
    @fastapi_app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return {"status": "ok", "model_id": self.predictor.model_id, "backend": self.predictor.backend,
                "classes": self.classes, "image_size": self.predictor.image_size, "threads": self.threads,
                "batching": self.batching, "batches": self.batches, "batched_images": self.batched_images,
                "max_batch_size_seen": self.max_batch_size_seen, "explained": self.explaining.explained,
                "explain_refused": self.explaining.refused}

    @fastapi_app.get("/")
    async def index(self) -> dict:
        return {"service": "kdray student classifier", "docs": "/docs", "openapi": "/openapi.json",
                "predict": "POST /predict (the image as the body, or multipart field 'file')",
                "open_inference_protocol": f"/v2/models/{self.model_name}", "health": "/healthz"}


# -- building and deploying

def _resolve_model_dir(model_dir: str) -> str:
    """Local paths become absolute (replicas may not share the caller's cwd) and must exist."""
    model_dir = str(model_dir).strip()
    if model_dir.startswith("file://"):
        model_dir = model_dir[len("file://"):]
    if "://" in model_dir:  # s3://…: checked by the replica when it loads
        return model_dir
    path = os.path.abspath(os.path.expanduser(model_dir))
    if not os.path.isdir(path):
        raise KdrayError(f"model_dir {model_dir!r} (resolved to {path}) is not a folder: pass an exported model "
                         "folder (metadata.json) or a training checkpoint")
    return path


def deployment_options(max_replicas: int | None = None, num_cpus: float | None = None,
                       admission_limit: int | None = None, **overrides) -> dict:
    """:data:`serve.options.DEPLOYMENT` with the environment's replica bound and CPUs per replica applied
    (and, for tests and benchmarks, another admission limit: ``KDRAY_ADMISSION_LIMIT`` in the replica)."""
    options = copy.deepcopy(DEPLOYMENT)
    if max_replicas is not None:
        scaling = options["autoscaling_config"]
        scaling["max_replicas"] = int(max_replicas)
        scaling["min_replicas"] = min(scaling["min_replicas"], int(max_replicas))
    if num_cpus is not None:
        options["ray_actor_options"]["num_cpus"] = float(num_cpus)
    if admission_limit is not None:
        options["ray_actor_options"]["runtime_env"]["env_vars"][LIMIT_ENV] = str(int(admission_limit))
    options.update(overrides)
    return options


BATCHING_CHOICES = {"auto": "auto", "on": True, "off": False, "true": True, "false": False}


def build_app(model_dir: str, backend: str = "auto", threads: int | None = None,
              batching: str | bool = BATCHING["enabled"],
              **deployment_overrides) -> Application:
    """The bound application; ``deployment_overrides`` go to :func:`deployment_options`.

    ``batching``: ``auto`` (on when the model runs on a GPU), ``on`` or ``off``."""
    if backend not in BACKENDS:
        raise KdrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if str(batching).lower() not in BATCHING_CHOICES:
        raise KdrayError(f"unknown batching {batching!r}; choose auto, on or off")
    options = deployment_options(**deployment_overrides)
    deployment = StudentClassifier.options(**options) if options != DEPLOYMENT else StudentClassifier
    return deployment.bind(_resolve_model_dir(model_dir), backend, threads, BATCHING_CHOICES[str(batching).lower()])


APP_ARGS = ("model_dir", "backend", "threads", "batching", "max_replicas", "num_cpus")


def app_builder(args: dict) -> Application:
    """Builder for ``serve run serve.app:app_builder model_dir=... [backend=...]`` and config files.

    ``max_replicas`` and ``num_cpus`` (per replica) are the environment's knobs (a KubeRay RayService sets
    them); everything else about the deployment comes from :mod:`serve.options`."""
    args = dict(args or {})
    model_dir = args.pop("model_dir", None)
    if not model_dir:
        raise KdrayError("serve.app:app_builder needs model_dir: an exported model folder or a training checkpoint, "
                         "e.g. `serve run serve.app:app_builder model_dir=runs/pipeline/export/student`, or "
                         "applications[].args.model_dir in a config file")
    backend = str(args.pop("backend", None) or "auto")
    threads = args.pop("threads", None)
    batching = args.pop("batching", BATCHING["enabled"])
    environment = {}
    try:
        for key, kind in (("max_replicas", int), ("num_cpus", float)):
            if args.get(key) is not None:
                environment[key] = kind(args.pop(key))
    except (TypeError, ValueError):
        raise KdrayError("serve.app:app_builder: max_replicas must be an integer and num_cpus a number") from None
    if args:
        raise KdrayError(f"serve.app:app_builder: unknown argument(s) {', '.join(sorted(args))}; "
                         f"expected {', '.join(APP_ARGS)}")
    return build_app(str(model_dir), backend, int(threads) if threads else None, batching, **environment)


def deploy(model_dir: str, port: int = 8000, backend: str = "auto", *, num_replicas: int | None = None,
           num_cpus: float | None = None, threads: int | None = None, batching: str | bool = BATCHING["enabled"],
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
    host, actual_port = "127.0.0.1", int(port)
    try:  # Serve ignores new http_options when it is already running: report where it really listens
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        actual_port = int(http.port)
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "", None) else http.host
    except Exception:  # noqa: BLE001 - private API; the requested address is the best guess
        pass
    if actual_port != int(port):
        log.warning("Serve was already running on port %d; port %d was not applied", actual_port, port)
    serve.run(app, name=name, route_prefix=route_prefix, logging_config=ACCESS_LOG_OFF)
    proxy_url = f"http://{host}:{actual_port}{route_prefix.rstrip('/')}"
    direct = replica_urls(name, actual_port)
    if len(direct) == 1:  # direct ingress: the replica answers HTTP itself, one Python hop fewer
        log.info("serving at %s (the replica, direct ingress); through Serve's proxy at %s", direct[0], proxy_url)
        return f"{direct[0]}{route_prefix.rstrip('/')}"
    if direct:
        log.info("replicas answer directly at %s; Serve's proxy balances them at %s", ", ".join(direct), proxy_url)
    return proxy_url


def _replicas_that_fit(num_cpus: float) -> int:
    """The autoscaling bound on a Ray that kdray started here: no more replicas than its CPUs can ever hold.

    Such a Ray has one node and no autoscaler, so a replica past that bound never starts; it only waits, and
    while it waits the running replica's tail latency grows (p99 at half the peak rate 42-47 ms against
    14-22 ms with one fixed replica, bench/results/serve-pending-replica.md). On a cluster the bound stays
    :data:`serve.options.DEPLOYMENT`'s, because a waiting replica is what asks the cluster for a node."""
    import ray

    wanted = int(DEPLOYMENT["autoscaling_config"]["max_replicas"])
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

    wanted = float(DEPLOYMENT["ray_actor_options"]["num_cpus"])
    free = float(ray.available_resources().get("CPU", 0.0))
    if free >= wanted:
        return wanted
    fitted = max(0.5, math.floor(free * 2) / 2)
    log.info("a replica asks for %.1f CPUs; %.1f are free here, so it asks for %.1f", wanted, free, fitted)
    return fitted


def replica_urls(name: str, proxy_port: int, wait_s: float = 10.0) -> list[str]:
    """The HTTP addresses of the app's replicas when Serve runs with direct ingress
    (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` where the nodes start); else an empty list."""
    import time

    import ray
    from ray.serve.context import _get_global_client

    deadline = time.time() + (wait_s if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" else 0.0)
    while True:
        try:
            groups = ray.get(_get_global_client()._controller.get_target_groups.remote(name), timeout=30)
        except Exception as exc:  # noqa: BLE001 - private API: the proxy URL still works
            log.info("cannot list the replicas' addresses (%s); using Serve's proxy", type(exc).__name__)
            return []
        urls = sorted({f"http://{t.ip}:{t.port}" for g in groups if "HTTP" in str(g.protocol).upper()
                       and g.app_name == name for t in g.targets if t.port != proxy_port})
        if urls or time.time() >= deadline:
            return urls
        time.sleep(0.5)
