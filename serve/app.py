"""Ray Serve app: the distilled student behind a FastAPI ingress, with dynamic batching.

Endpoints (route prefix ``/``):

* ``POST /predict`` — multipart upload, field ``file`` (PNG/JPEG/… or octet-stream) →
  ``{"label", "probabilities": {class: p}, "covid_suspect": bool|null, "model_id", "backend"}``.
  400 = undecodable image, 413 = upload too large, 415 = unsupported content type (DICOM too),
  422 = no ``file`` field.
* ``GET /healthz`` — model identity plus this replica's batching counters.
* ``GET /`` — links; ``GET /docs`` — OpenAPI UI; ``GET /openapi.json``.

Each request is decoded with :func:`kdray.data.decode_image` (the one preprocessing path)
in its own handler, *before* batching, so a corrupt upload fails alone and never a batch.
Decoding runs in a worker thread; decoded images are then grouped by ``@serve.batch`` and
classified with one ``Predictor.probabilities`` call per batch, run *on* the event loop (see
``StudentClassifier.classify`` for why that gives larger batches than offloading it).

Run it:

* ``serve run serve.app:app_builder model_dir=runs/pipeline/export/student [backend=onnx-int8]``
* ``serve run serve/config.yaml`` / ``serve deploy serve/config.yaml``
* from Python: ``serve.app.deploy(model_dir, port=8000)`` → base URL (used by the pipeline job and tests).
"""

import asyncio
import logging
import math
import os

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from kdray import KdrayError
from kdray.data import decode_image
from kdray.predictor import BACKENDS, Predictor

log = logging.getLogger(__name__)

APP_NAME = "kdray"
MAX_BATCH_SIZE = 16
BATCH_WAIT_TIMEOUT_S = 0.01
MAX_UPLOAD_BYTES = 32 * 1024 * 1024
DICOM_TYPES = ("application/dicom", "application/dicom+json", "application/dicom+xml", "image/dicom")
ACCESS_LOG_OFF = {"enable_access_log": False}

#: Defaults of the deployment; serve/config.yaml states the same values (a config file overrides them).
DEPLOYMENT_DEFAULTS = {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                           "upscale_delay_s": 5, "downscale_delay_s": 30},
    "max_ongoing_requests": MAX_BATCH_SIZE,
    "ray_actor_options": {"num_cpus": 0.5},
}


class Prediction(BaseModel):
    label: str = Field(description="most probable class")
    probabilities: dict[str, float] = Field(description="class → probability (sums to 1)")
    covid_suspect: bool | None = Field(description="P(covid) >= the model's stored threshold; "
                                                    "null when the model has no threshold")
    model_id: str
    backend: str


class Health(BaseModel):
    status: str
    model_id: str
    backend: str
    classes: list[str]
    image_size: int
    threads: int
    batches: int = Field(description="batches this replica has run")
    batched_images: int = Field(description="images this replica has classified")
    max_batch_size_seen: int = Field(description="largest batch this replica has run")


class ErrorDetail(BaseModel):
    detail: str


fastapi_app = FastAPI(
    title="kdray student classifier",
    description="Chest X-ray classification by the distilled MobileNetV2 student (kdray). "
                "POST an image to /predict as multipart field `file`.",
    version="1",
)


def replica_threads() -> int:
    """Inference threads for this process: the CPUs Ray assigned to it, rounded up, at least 1."""
    try:
        import ray

        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = 0.0
    return max(1, math.ceil(cpus))


def _media_type(content_type: str | None) -> str:
    return (content_type or "application/octet-stream").split(";", 1)[0].strip().lower()


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@serve.deployment(**DEPLOYMENT_DEFAULTS)
@serve.ingress(fastapi_app)
class StudentClassifier:
    """One replica: a loaded :class:`kdray.predictor.Predictor` plus batching counters."""

    def __init__(self, model_dir: str, backend: str = "auto", threads: int | None = None):
        self.threads = max(1, int(threads)) if threads else replica_threads()
        self.predictor = Predictor.load(model_dir, backend=backend, threads=self.threads)
        self.classes = list(self.predictor.classes)
        size = self.predictor.image_size
        # Warm-up: the first request should not pay for lazy initialisation, and a model that
        # cannot run should fail the replica's start, not its first user.
        self.predictor.probabilities(np.zeros((1, size, size), dtype=np.uint8))
        self.batches = self.batched_images = self.max_batch_size_seen = 0
        log.info("kdray student %s (%s, %d threads) ready", self.predictor.model_id, self.predictor.backend,
                 self.threads)

    # -- batching
    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def classify(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for decoded uint8 [S, S] images: one ``probabilities`` call per batch."""
        # Deliberately blocking (no asyncio.to_thread). serve.batch does not await a batch before
        # forming the next one: it closes the next batch batch_wait_timeout_s after its first
        # arrival, then parks it until the running one is done. With inference in a thread, that
        # next batch is closed while this one runs and holds only the 1-2 requests that arrived in
        # those 10 ms; blocking the replica's user event loop instead lets every request that
        # arrives meanwhile join the next batch (larger batches: docs/architecture.md, "Measured
        # choices"). Health checks run on Serve's own loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD).
        probs = self.predictor.probabilities(np.stack(images))
        self.batches += 1
        self.batched_images += len(images)
        self.max_batch_size_seen = max(self.max_batch_size_seen, len(images))
        return list(probs)

    def _response(self, probs: np.ndarray) -> dict:
        flags = self.predictor.covid_suspect(probs[None])
        suspect = None if flags is None else bool(flags[0])
        return {"label": self.classes[int(np.argmax(probs))],
                "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                "covid_suspect": suspect, "model_id": self.predictor.model_id, "backend": self.predictor.backend}

    # -- HTTP
    @fastapi_app.post("/predict", response_model=Prediction,
                      responses={400: {"model": ErrorDetail, "description": "the upload is not a decodable image"},
                                 413: {"model": ErrorDetail, "description": "upload too large"},
                                 415: {"model": ErrorDetail, "description": "unsupported content type"}})
    async def predict(self, file: UploadFile = File(description="chest X-ray image (PNG, JPEG, …)")) -> dict:
        media = _media_type(file.content_type)
        if media in DICOM_TYPES:
            raise HTTPException(415, f"unsupported content type {media}: DICOM is not supported, "
                                     "convert the image to PNG or JPEG first")
        if not (media.startswith("image/") or media == "application/octet-stream"):
            raise HTTPException(415, f"unsupported content type {media}: upload an image (image/png, image/jpeg, "
                                     "...) or application/octet-stream")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
        if not data:
            raise HTTPException(400, "cannot decode image: empty upload")
        try:
            image = await asyncio.to_thread(decode_image, data, self.predictor.image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad input
            raise HTTPException(400, f"cannot decode image: {_one_line(exc)}") from None
        probs = await self.classify(image)
        return self._response(probs)

    @fastapi_app.get("/healthz", response_model=Health)
    async def healthz(self) -> dict:
        return {"status": "ok", "model_id": self.predictor.model_id, "backend": self.predictor.backend,
                "classes": self.classes, "image_size": self.predictor.image_size, "threads": self.threads,
                "batches": self.batches, "batched_images": self.batched_images,
                "max_batch_size_seen": self.max_batch_size_seen}

    @fastapi_app.get("/")
    async def index(self) -> dict:
        return {"service": "kdray student classifier", "docs": "/docs", "openapi": "/openapi.json",
                "predict": "POST /predict (multipart field 'file')", "health": "/healthz"}


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


def build_app(model_dir: str, backend: str = "auto", threads: int | None = None, **deployment_options) -> Application:
    """The bound application; ``deployment_options`` override :data:`DEPLOYMENT_DEFAULTS`."""
    if backend not in BACKENDS:
        raise KdrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    deployment = StudentClassifier.options(**deployment_options) if deployment_options else StudentClassifier
    return deployment.bind(_resolve_model_dir(model_dir), backend, threads)


def app_builder(args: dict) -> Application:
    """Builder for ``serve run serve.app:app_builder model_dir=... [backend=...]`` and config files."""
    args = dict(args or {})
    model_dir = args.pop("model_dir", None)
    if not model_dir:
        raise KdrayError("serve.app:app_builder needs model_dir: an exported model folder or a training checkpoint, "
                         "e.g. `serve run serve.app:app_builder model_dir=runs/pipeline/export/student`, or "
                         "applications[].args.model_dir in a config file")
    backend = str(args.pop("backend", None) or "auto")
    threads = args.pop("threads", None)
    if args:
        raise KdrayError(f"serve.app:app_builder: unknown argument(s) {', '.join(sorted(args))}; "
                         "expected model_dir, backend, threads")
    return build_app(str(model_dir), backend, int(threads) if threads else None)


def deploy(model_dir: str, port: int = 8000, backend: str = "auto", *, num_replicas: int | None = None,
           num_cpus: float | None = None, threads: int | None = None, name: str = APP_NAME) -> str:
    """Start Serve on 127.0.0.1:``port`` (joining or starting Ray), deploy the student, return its base URL.

    ``num_replicas`` fixes the replica count (autoscaling off); ``num_cpus`` sets each replica's CPUs.
    If Serve is already running, its existing HTTP address is kept and returned.
    """
    from kdray.raycluster import init_ray

    options: dict = {}
    if num_replicas is not None:
        options.update(num_replicas=int(num_replicas), autoscaling_config=None)
    if num_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": float(num_cpus)}
    app = build_app(model_dir, backend, threads, **options)
    init_ray()
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
    serve.run(app, name=name, route_prefix="/", logging_config=ACCESS_LOG_OFF)
    return f"http://{host}:{actual_port}"
