"""The model handler of a replica: decode → predict → encode, and explanations. No Ray, no HTTP.

As LitServe and MLServer do, kdray keeps the model apart from its transport: :mod:`serve.app` turns HTTP
requests into calls on a :class:`StudentHandler` and its results or refusals into responses, and the handler
runs, and is tested, with no server at all (tests/test_handler.py).

Each image goes through the shared loader (:func:`kdray.images.load_image` under
:data:`serve.options.IMAGE_LIMITS`: PNG, JPEG, TIFF, BMP, WebP and DICOM, judged by content) in a small thread
pool, never on the event loop, so a bad upload fails alone. On a CPU the same pool thread classifies it
(single-threaded inference, no batching: it does not pay there); on a GPU the transport groups decoded images
into batches (``@serve.batch`` around :meth:`StudentHandler.classify_batch`). Explanations run in their own
thread, a bounded number at a time (:mod:`serve.explaining`). A request's images together have a decode budget
(:class:`DecodeBudget`); an Open Inference Protocol request is parsed in the pool too.

Refusals are exceptions the transport maps to statuses: :class:`kdray.images.ImageRefused` (400, its reason
code), :class:`DecodeBudgetSpent` (400), :class:`serve.explaining.ExplainBusy` (503),
:class:`serve.explaining.ExplainTooLarge` (400), :class:`serve.explaining.ExplainUnavailable` (501), and
:class:`serve.oip.OipError` for the Open Inference Protocol (400, its reason code).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kdray.dicom_results import Finding, ModelIdentity, NotADicomSource, read_source, structured_report, to_bytes
from kdray.images import ImageLimits, ImageRefused, LoadedImage, load_image, sniff_format
from kdray.predictor import is_export, load_predictor, model_info, read_model_card
from kdray.schemas import ModelCard
from serve import oip
from serve.explaining import ExplainGate
from serve.options import EXPLAIN, IMAGE_LIMITS, REQUEST, WORKER_THREADS, ExplainOptions, RequestOptions
from serve.schemas import Health, ModelCardOut, Prediction

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "kdray-student"  # a training checkpoint served directly has no model card
#: The batch classifier a transport installs on a GPU: decoded images in, probabilities out, batched.
BatchClassifier = Callable[[np.ndarray], Awaitable[np.ndarray]]


class DecodeBudgetSpent(Exception):
    """A request whose images together cost more to decode than its budget."""

    reason = "request_decode_budget"


class DecodeBudget:
    """The decode budget of one request's images together: each decode spends what the per-image budget admitted
    for it (:attr:`kdray.images.LoadedImage.decode_bytes`); once the total is over, the request is refused and
    its images not yet started are not decoded. Pool threads share it."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.spent = int(max_bytes), 0
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.spent > self.max_bytes:
            raise DecodeBudgetSpent(f"decoding this request's images would take over {self.max_bytes // 2**20} MiB "
                                    "of memory in all; send fewer or smaller images per request")

    def spend(self, loaded: LoadedImage) -> LoadedImage:
        with self._lock:
            self.spent += loaded.decode_bytes
        self.check()
        return loaded


def runs_on_gpu(model_dir: str, backend: str) -> bool:
    """Whether load_predictor(model_dir, backend) will run on a GPU: the torch backend with CUDA present."""
    import torch

    return model_info(model_dir, backend).backend == "torch" and torch.cuda.is_available()


class StudentHandler:
    """One replica's model: a loaded :class:`kdray.predictor.Predictor`, a decode pool, explanations, counters.

    ``batching``: True when a transport will group images (:meth:`classify_batch` behind ``batch_classifier``);
    ``threads``: inference threads (one per pool thread when not batching)."""

    def __init__(self, model_dir: str, backend: str = "auto", threads: int = 1, batching: bool = False,
                 limits: ImageLimits = IMAGE_LIMITS, worker_threads: int = WORKER_THREADS,
                 explain: ExplainOptions = EXPLAIN, requests: RequestOptions = REQUEST):
        self.batching, self.threads, self.limits = bool(batching), max(1, int(threads)), limits
        self.requests = requests
        self.predictor = load_predictor(model_dir, backend=backend, threads=self.threads)
        self.classes = list(self.predictor.classes)
        card = read_model_card(model_dir) if is_export(model_dir) else None
        if card is not None:
            self.model_name, self.model_version = card.name, card.version
        else:
            self.model_name, self.model_version = DEFAULT_MODEL_NAME, self.predictor.model_id
        self.card = self._card_out(card, model_info(model_dir, backend).calibration or {})
        self.pool = ThreadPoolExecutor(worker_threads, thread_name_prefix="kdray-image")
        size = self.predictor.image_size
        self.probe_pixels = np.zeros((size, size), dtype=np.uint8)  # the readiness probe's image
        # Warm-up: the first request should not pay for lazy initialisation, and a model that cannot run should
        # fail the replica's start, not its first user.
        self.predictor.probabilities(self.probe_pixels[None])
        self.batches = self.batched_images = self.max_batch_size_seen = 0
        self.counting = threading.Lock()  # pool threads count concurrently
        self.explaining = ExplainGate(model_dir, explain.max_in_flight, explain.threads, explain.nice,
                                      requests.max_explain_images)
        self.batch_classifier: BatchClassifier | None = None

    def _card_out(self, card: ModelCard | None, calibration: dict) -> ModelCardOut:
        from kdray.export import INTENDED_USE, KNOWN_BIASES  # a checkpoint has no card: the export's wording

        p, split, n = self.predictor, calibration.get("split"), calibration.get("n")
        return ModelCardOut(name=self.model_name, version=self.model_version, model_id=p.model_id,
                            backend=p.backend, classes=self.classes, image_size=p.image_size,
                            covid_threshold=p.covid_threshold,
                            target_sensitivity=calibration.get("target_sensitivity"),
                            threshold_fitted_on=f"{split} split, {n} images" if split and n else None,
                            intended_use=card.intended_use if card else INTENDED_USE,
                            known_biases=card.known_biases if card else KNOWN_BIASES)

    # -- classifying
    def classify_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for decoded uint8 [S, S] images: one model call (the batched path)."""
        probs = self.predictor.probabilities(np.stack(images))
        self._count(len(images))
        return list(probs)

    def new_budget(self) -> DecodeBudget:
        return DecodeBudget(self.requests.max_decode_bytes)

    async def probabilities(self, data: bytes, budget: DecodeBudget | None = None) -> np.ndarray:
        """Probabilities for one encoded image (``budget``: its request's); raises ImageRefused or
        DecodeBudgetSpent. Decoding never runs on the event loop."""
        loop = asyncio.get_running_loop()
        budget = budget or self.new_budget()
        if self.batch_classifier is None:
            return await loop.run_in_executor(self.pool, self._classify_now, data, budget)
        loaded = await loop.run_in_executor(self.pool, self._load, data, budget)
        return await self.batch_classifier(loaded.pixels)

    def _load(self, data: bytes, budget: DecodeBudget) -> LoadedImage:
        budget.check()  # spent by the request's other images: this one is not decoded
        return budget.spend(load_image(data, self.predictor.image_size, self.limits))

    def _classify_now(self, data: bytes, budget: DecodeBudget) -> np.ndarray:
        return self._classify_keeping_pixels(data, budget)[0]

    def _classify_keeping_pixels(self, data: bytes, budget: DecodeBudget) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, decoded pixels) of one image, in the calling (pool) thread."""
        pixels = self._load(data, budget).pixels
        probs = self.predictor.probabilities(pixels[None])[0]
        self._count(1)
        return probs, pixels

    async def _explained(self, images: list[bytes]) -> tuple[np.ndarray, list]:
        """(probabilities, explanations) for encoded images, inside one admitted explanation (raises
        ExplainTooLarge or ExplainBusy when it cannot have one). Predictions are computed as without explain (same
        pool, same model)."""
        self.explaining.admit(len(images))
        try:
            loop, budget = asyncio.get_running_loop(), self.new_budget()
            results = await asyncio.gather(*(loop.run_in_executor(self.pool, self._classify_keeping_pixels, d, budget)
                                             for d in images))
            probs = np.stack([p for p, _ in results])
            explanations = await self.explaining.explain(np.stack([x for _, x in results]), list(probs.argmax(1)))
            return probs, explanations
        finally:
            self.explaining.release(len(images))

    def _count(self, images: int) -> None:
        with self.counting:
            self.batches += 1
            self.batched_images += images
            self.max_batch_size_seen = max(self.max_batch_size_seen, images)

    # -- /predict
    async def predict(self, data: bytes, explain: bool = False) -> Prediction:
        """The prediction for one encoded image, with its Grad-CAM overlay when ``explain``."""
        if not explain:
            return self.prediction(await self.probabilities(data))
        probs, explanations = await self._explained([data])
        return self.prediction(probs[0], explanations[0].to_json())

    def prediction(self, probs: np.ndarray, explanation: dict | None = None) -> Prediction:
        flags = self.predictor.covid_suspect(probs[None])
        fields = {"label": self.classes[int(np.argmax(probs))],
                  "probabilities": {c: float(p) for c, p in zip(self.classes, probs)},
                  "covid_suspect": None if flags is None else bool(flags[0]),
                  "model_id": self.predictor.model_id, "backend": self.predictor.backend}
        if explanation is not None:
            fields["explanation"] = explanation
        return Prediction(**fields)

    # -- /predict answered as DICOM (Accept: application/dicom)
    async def structured_report(self, data: bytes) -> bytes:
        """The DICOM SR (Part 10 bytes, :mod:`kdray.dicom_results`) of one DICOM image; a body that is not DICOM
        raises :class:`kdray.dicom_results.NotADicomSource` before any decoding."""
        if sniff_format(data) != "dicom":
            raise NotADicomSource("an SR refers to its source's patient, study and instance: send a DICOM image "
                                  "(application/dicom), or accept application/json")
        probs = await self.probabilities(data)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._report, data, probs)

    def _report(self, data: bytes, probs: np.ndarray) -> bytes:
        flags = self.predictor.covid_suspect(probs[None])
        finding = Finding(tuple(self.classes), tuple(float(p) for p in probs),
                          None if flags is None else bool(flags[0]), self.predictor.covid_threshold)
        model = ModelIdentity.of(self.model_name, self.model_version, self.predictor.model_id)
        return to_bytes(structured_report(read_source(data), finding, model))

    # -- the Open Inference Protocol
    def knows_model(self, model: str) -> bool:
        return model == self.model_name

    def unknown_model(self, model: str) -> str:
        return f"unknown model {model[:80]!r}; this server serves {self.model_name!r}"

    def server_metadata(self) -> dict:
        return oip.server_metadata(self.model_version)

    def model_metadata(self) -> dict:
        return oip.model_metadata(self.model_name, self.model_version, self.classes,
                                  oip.platform_of(self.predictor.backend))

    async def parse_infer(self, body: bytes, header_length: str | None) -> oip.InferRequest:
        """The OIP request in ``body``, parsed (JSON, base64) in the pool, off the event loop; raises OipError."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, oip.parse_infer_request, body,
                                                                header_length, self.requests)

    async def infer(self, infer: oip.InferRequest) -> tuple[bytes, dict[str, str]]:
        """(body, headers) of the OIP response; a refused image raises OipError naming it (and its reason)."""
        if infer.explain:
            try:
                probs, explanations = await self._explained(infer.images)
            except (ImageRefused, DecodeBudgetSpent) as exc:  # which image: the explain path decodes them together
                raise oip.OipError(f"{oip.INPUT_NAME} refused ({exc.reason}): {exc}", exc.reason) from None
        else:
            explanations = None
            budget = self.new_budget()
            results = await asyncio.gather(*(self.probabilities(d, budget) for d in infer.images),
                                           return_exceptions=True)
            for index, result in enumerate(results):
                if isinstance(result, (ImageRefused, DecodeBudgetSpent)):
                    raise oip.OipError(f"{oip.INPUT_NAME}[{index}] refused ({result.reason}): {result}",
                                       result.reason)
                if isinstance(result, BaseException):
                    raise result
            probs = np.stack(results)
        labels = [self.classes[i] for i in probs.argmax(1)]
        return oip.encode_infer_response(self.model_name, self.model_version, infer, probs, labels, explanations)

    # -- health
    async def probe(self) -> None:
        """One inference of a small blank image through the serving path (the pool on a CPU, the batcher on a
        GPU, where /healthz's counters count it); raises when the model does not answer with probabilities."""
        if self.batch_classifier is None:
            probs = await asyncio.get_running_loop().run_in_executor(self.pool, self.predictor.probabilities,
                                                                     self.probe_pixels[None])
        else:
            probs = (await self.batch_classifier(self.probe_pixels))[None]
        if probs.shape != (1, len(self.classes)) or not np.isfinite(probs).all():
            raise ValueError(f"the model answered {probs.shape} values (finite: {bool(np.isfinite(probs).all())}), "
                             f"not {len(self.classes)} probabilities")

    def health(self) -> Health:
        return Health(status="ok", model_id=self.predictor.model_id, backend=self.predictor.backend,
                      classes=self.classes, image_size=self.predictor.image_size, threads=self.threads,
                      batching=self.batching, batches=self.batches, batched_images=self.batched_images,
                      max_batch_size_seen=self.max_batch_size_seen, explained=self.explaining.explained,
                      explain_refused=self.explaining.refused)

    def index(self) -> dict:
        return {"service": "kdray student classifier", "docs": "/docs", "openapi": "/openapi.json",
                "predict": "POST /predict (the image as the body, or multipart field 'file')",
                "open_inference_protocol": f"/v2/models/{self.model_name}", "health": "/healthz"}
