"""One predictor over ONNX Runtime or torch, and the read side of an export: the model card.

``load_predictor(uri)`` accepts a training checkpoint (or run folder), served with torch, or an
export folder (``metadata.json`` plus ONNX files), served with ONNX Runtime: by default the
artifact the card names as served (int8 when it passed its parity checks, else fp32). An export may be
named by a pinned reference, ``<folder>@sha256:<digest of metadata.json>`` (:mod:`kdray.pinning`).
Every artifact is read once, checked against the card's sha256 and loaded from those same bytes: there is
no cache on disk to swap between the check and the load. Each
predictor carries the temperature and covid threshold fitted for exactly what it runs: an ONNX
artifact's own operating point from the card, or a checkpoint's own calibration.

The logit cache, evaluation, scoring, serving and ``kdray predict`` all classify through here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from kdray import KdrayError, first_line, storage
from kdray.checkpoints import read_checkpoint_meta
from kdray.config import AugmentConfig
from kdray.pinning import IntegrityError, check_digest, model_id, parse_ref, plain_file_name, sha256_hex
from kdray.predictor_base import Predictor
from kdray.schemas import ModelCard, parse

log = logging.getLogger(__name__)
MODEL_CARD_FILE = "metadata.json"
BACKENDS = ("auto", "onnx-int8", "onnx-fp32", "torch")
ONNX_BACKENDS = {"onnx-int8": "int8", "onnx-fp32": "fp32"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
ORT_CHUNK = 8  # images per ONNX Runtime call inside one predictor call (see OrtPredictor)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def batches(images: np.ndarray, batch_size: int = 64):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def ort_session(model: str | bytes, threads: int | None = None, what: str | None = None):
    """An ONNX Runtime CPU session over a model file or a model's bytes (``what`` names it in errors):
    ``threads`` intra-op threads (default: the CPUs available), one inter-op thread, sequential execution, all
    graph optimisations.

    The intra-op threads busy-wait between runs only when the session has every CPU to itself (``threads``
    equals the CPUs available: ``kdray predict``, a single scorer); spinning saves a wake-up per call
    (docs/architecture.md, "Measured choices"). With fewer threads than CPUs (Ray actors and Serve
    replicas sharing the node) it would burn cores that the neighbours need, so it is off.
    """
    import onnxruntime as ort

    cpus = available_cpus()
    intra = int(threads) if threads else cpus
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if intra >= cpus else "0")
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise KdrayError(f"{what or model}: cannot load ONNX model ({first_line(exc)})") from None


# ----------------------------------------------------------------------------- predictors


def load_predictor(uri: str, backend: str = "auto", threads: int | None = None,
                   device: str | None = None) -> Predictor:
    """The predictor for an export folder (its served artifact, or the one ``backend`` names) or a training
    checkpoint (torch)."""
    if backend not in BACKENDS:
        raise KdrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if is_export(uri):
        return load_exported(uri, backend, threads)
    if backend.startswith("onnx"):
        raise KdrayError(f"{uri}: backend {backend} needs an exported model folder (run jobs.export)")
    from kdray.torch_predictor import TorchPredictor  # torch loads only for the torch backend

    return TorchPredictor.from_checkpoint(uri, threads, device)


class OrtPredictor(Predictor):
    """A :class:`Predictor` over an ONNX Runtime session whose graph takes the uint8 images directly.

    Large batches run as consecutive chunks of ``chunk`` images, so that a chunk's activations stay in
    the CPU caches (docs/architecture.md, "Measured choices"). Results are identical; the chunks are
    independent.
    """

    def __init__(self, session, classes: list[str], image_size: int, backend: str, temperature: float = 1.0,
                 covid_threshold: float | None = None, model_id: str = "", chunk: int = ORT_CHUNK):
        super().__init__(classes, image_size, backend, temperature, covid_threshold, model_id)
        self.session, self.chunk = session, max(1, int(chunk))

    def logits(self, images, augment: AugmentConfig | None = None, seeds=None) -> np.ndarray:
        if augment is not None and augment.enabled:
            raise KdrayError(f"{self.backend}: augmented views need the torch backend (a training checkpoint)")
        x = np.ascontiguousarray(self.check_input(images), dtype=np.uint8)
        if len(x) <= self.chunk:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return np.concatenate([self.session.run([OUTPUT_NAME], {INPUT_NAME: c})[0] for c in batches(x, self.chunk)])


def measure_throughput(predictor: Predictor, images: np.ndarray, batch_size: int = 32, min_seconds: float = 2.0) -> float:
    """Images per second of ``predictor.logits`` on ``images`` in batches (after one warm-up batch)."""
    predictor.logits(images[:batch_size])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds or done == 0:
        for i in range(0, len(images), batch_size):
            done += len(predictor.logits(images[i:i + batch_size]))
    return round(done / (time.perf_counter() - started), 2)


# ----------------------------------------------------------------------------- reading an export


#: A model card is a few kB; a larger metadata.json is refused unread past this.
MAX_CARD_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Export:
    """An export folder's model card, read once: the folder, the card, the sha256 of the card's bytes, and whether
    a pin vouched for them (:mod:`kdray.pinning`; unpinned, the card vouches for itself)."""

    uri: str
    card: ModelCard
    digest: str
    pinned: bool

    def file_uri(self, file: str) -> str:
        """Where the card's ``file`` is: inside the export, or an error (the schema already refuses such names;
        checked again here, where it is joined)."""
        try:
            return storage.join(self.uri, plain_file_name(file))
        except ValueError as exc:
            raise IntegrityError("artifact_outside_export", f"{self.uri}: {exc}") from None

    def read_verified(self, file: str, sha256: str) -> bytes:
        """The bytes of the card's ``file``, read once and checked against the card's sha256: the caller loads
        the model from these bytes, so nothing can swap the file between the check and the load."""
        uri = self.file_uri(file)
        return check_digest(uri, storage.read_bytes(uri), sha256, "artifact_digest_mismatch", "the model card's")

    def model_id(self, variant: str) -> str:
        return model_id(self.card.name, self.card.version, self.digest, variant)


def is_export(uri: str) -> bool:
    """An export folder (``metadata.json``), or a pinned reference: a pin always names an export."""
    ref = parse_ref(uri)
    return ref.digest is not None or storage.exists(storage.join(ref.uri, MODEL_CARD_FILE))


def open_export(uri: str) -> Export:
    """The export a (pinned or plain) reference names, its card validated, or a one-line error saying what is
    wrong: a missing or corrupt card, or one whose sha256 is not the pin (``model_digest_mismatch``)."""
    import json

    ref = parse_ref(uri)
    loc = storage.resolve(storage.join(ref.uri, MODEL_CARD_FILE))
    if not storage.exists(loc):
        raise KdrayError(f"{ref.uri}: not an exported model ({MODEL_CARD_FILE} missing; run jobs.export)")
    data = storage.read_bytes(loc, MAX_CARD_BYTES)
    if ref.digest is not None:
        digest = sha256_hex(data)
        if digest != ref.digest:
            raise IntegrityError("model_digest_mismatch", f"{loc.uri}: sha256 {digest[:12]}… is not the pinned "
                                                          f"{ref.digest[:12]}… (the export changed since it was pinned)")
    try:
        card_data = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdrayError(f"{loc.uri}: corrupt model card ({exc})") from None
    return Export(ref.uri, parse(ModelCard, card_data, loc.uri), ref.digest or sha256_hex(data), ref.digest is not None)


def read_model_card(uri: str) -> ModelCard:
    """The export's model card, validated (and checked against the pin of a pinned reference)."""
    return open_export(uri).card


@dataclass(frozen=True)
class ModelInfo:
    """What a stage needs to know about a model before running it: for a checkpoint or an export."""

    classes: list[str]
    image_size: int
    backend: str  # what load_predictor(uri, backend) will run: torch, onnx-fp32 or onnx-int8
    temperature: float
    covid_threshold: float | None
    calibration: dict | None = None


def model_info(uri: str, backend: str = "auto") -> ModelInfo:
    if not is_export(uri):
        meta = read_checkpoint_meta(uri)
        return ModelInfo(meta.classes, meta.image_size, "torch", meta.temperature, meta.covid_threshold,
                         meta.calibration)
    export = open_export(uri)
    card = export.card
    chosen = choose_backend(export.uri, card, backend)
    if chosen == "torch":
        meta = read_checkpoint_meta(card.source_checkpoint)
        return ModelInfo(card.classes, card.image_size, "torch", meta.temperature, meta.covid_threshold,
                         meta.calibration)
    op = card.operating_point(ONNX_BACKENDS[chosen])
    return ModelInfo(card.classes, card.image_size, chosen, op.temperature if op else 1.0,
                     op.covid_threshold if op else None, op.model_dump() if op else None)


def choose_backend(uri: str, card: ModelCard, backend: str) -> str:
    """``auto`` runs the served artifact; an explicit ONNX backend must exist and have passed parity."""
    if backend in ONNX_BACKENDS:
        kind = ONNX_BACKENDS[backend]
        if kind not in card.artifacts:
            raise KdrayError(f"{uri}: the export has no {kind} model (artifacts: {', '.join(card.artifacts)})")
        if not card.artifacts[kind].validated:
            raise KdrayError(f"{uri}: the {kind} model failed its parity check at export (validated=false)")
        return backend
    if backend == "auto" and card.served_artifact in ("int8", "fp32"):
        return f"onnx-{card.served_artifact}"
    return "torch"


def load_exported(uri: str, backend: str = "auto", threads: int | None = None) -> Predictor:
    """A predictor for an export (a folder, or a pinned reference): the served artifact (or the one ``backend``
    names), loaded from the very bytes checked against the card's sha256, with that artifact's own temperature
    and covid threshold."""
    export = open_export(uri)
    card, folder = export.card, export.uri
    for entry in card.artifacts.values():  # every listed file must be there
        if not storage.exists(export.file_uri(entry.file)):
            raise KdrayError(f"{export.file_uri(entry.file)}: artifact listed in {MODEL_CARD_FILE} is missing")
    chosen = choose_backend(folder, card, backend)
    if chosen == "torch":
        return _torch_fallback(export, threads)
    kind = ONNX_BACKENDS[chosen]
    entry = card.artifacts[kind]
    session = ort_session(export.read_verified(entry.file, entry.sha256), threads, export.file_uri(entry.file))
    out_shape, in_shape = session.get_outputs()[0].shape, session.get_inputs()[0].shape
    if len(out_shape) != 2 or out_shape[1] != len(card.classes):
        raise KdrayError(f"{folder}: {entry.file} outputs {out_shape[-1]} scores but the model card lists "
                         f"{len(card.classes)} classes {card.classes}")
    if len(in_shape) != 3 or list(in_shape[1:]) != [card.image_size, card.image_size]:
        raise KdrayError(f"{folder}: {entry.file} expects input {in_shape}, but the model card says "
                         f"image_size {card.image_size}")
    op = card.operating_point(kind)
    log.info("loaded %s (%s, %s)", export.model_id(kind), chosen, "pinned" if export.pinned else "unpinned")
    return OrtPredictor(session, card.classes, card.image_size, chosen, op.temperature if op else 1.0,
                        op.covid_threshold if op else None, model_id=export.model_id(kind))


def _torch_fallback(export: Export, threads: int | None) -> Predictor:
    """The export's source checkpoint in torch, its weights checked against the card's digest of them. A pinned
    export whose card has none (written before it was recorded) is refused: nothing would vouch for them."""
    from kdray.torch_predictor import TorchPredictor

    card, uri = export.card, export.uri
    if export.pinned and card.source_checkpoint_sha256 is None:
        raise IntegrityError("checkpoint_unverifiable", f"{uri}: the torch backend of a pinned export needs the "
                                                        "source checkpoint's sha256 in the card; export it again")
    try:
        predictor = TorchPredictor.from_checkpoint(card.source_checkpoint, threads,
                                                   expected_sha256=card.source_checkpoint_sha256)
    except IntegrityError:
        raise
    except KdrayError as exc:
        raise KdrayError(f"{uri}: the torch backend needs the source checkpoint, which cannot be loaded "
                         f"({exc})") from None
    if predictor.classes != card.classes:
        raise KdrayError(f"{uri}: source checkpoint classes {predictor.classes} differ from the model card's "
                         f"{card.classes}")
    predictor.model_id = export.model_id("torch")
    return predictor
