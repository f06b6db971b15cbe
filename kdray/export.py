"""Export a trained student to ONNX (fp32 and static int8), check parity, and load exports back.

An export folder (local or ``s3://``) holds::

    model.fp32.onnx        opset 17, input ``images`` uint8 [N, S, S] (grayscale; the scaling, the
                           grey-to-RGB repeat and the ImageNet normalisation run inside the graph),
                           output ``logits`` [N, C]
    model.int8.onnx        the same graph statically quantised (QDQ, per-channel weights), if requested
    model.torchscript.pt   a traced TorchScript module, if requested
    metadata.json          the model card; written LAST, it is the folder's commit marker

Every artifact is checked against the fp32 torch model on held-out images before it is
marked ``validated`` (top-1 agreement ≥ 99.5% for fp32/TorchScript, ≥ 99% for int8).
``load_exported`` verifies the card, the artifact's sha256 and its output width before it
serves anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import kdray
from kdray import KdrayError, storage
from kdray.config import AugmentConfig
from kdray.data import IMAGENET_MEAN, IMAGENET_STD, preprocess_config, to_model_input
from kdray.runtime import METADATA_FILE, Predictor, softmax

log = logging.getLogger(__name__)

FP32_FILE, INT8_FILE, TORCHSCRIPT_FILE = "model.fp32.onnx", "model.int8.onnx", "model.torchscript.pt"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 17
# minimum top-1 agreement with the fp32 torch model, per artifact
PARITY_BARS = {"fp32": 0.995, "int8": 0.99, "torchscript": 0.995}
ONNX_BACKENDS = {"onnx-int8": "int8", "onnx-fp32": "fp32"}
INTENDED_USE = "research; not for diagnosis"
KNOWN_BIASES = (
    "Trained on public chest X-ray collections in which source, patient age and image processing are "
    "confounded with the label: every COVID image comes from adult sources (many from journal figures or "
    "resized web copies), pneumonia is mostly paediatric (Kermany, one hospital), and normals mix paediatric "
    "and adult NIH/RSNA images. The model may recognise the source rather than the disease; check per-source "
    "metrics. COVID labels are partly PCR-based (radiographically normal images labelled covid) and the "
    "collections contain label noise and burned-in annotations. Not validated on any clinical population."
)
CALIBRATION_BATCH = 16
ORT_CHUNK = 8  # images per ONNX Runtime call inside one predictor call (see OrtPredictor)
# Static int8 settings. U8 activations x S8 weights is ORT's fast x86 kernel. reduce_range (7-bit weights) is
# on because on CPUs without VNNI (AVX2 only, like the 2-core dev box) the U8S8 kernel's 16-bit intermediate
# sums saturate: with it off, top-1 agreement with fp32 dropped by several points in our measurements.
QUANTIZATION = {"format": "QDQ", "activations": "QUInt8", "weights": "QInt8", "per_channel": True,
                "reduce_range": True, "calibration": "MinMax"}


class ParityError(KdrayError):
    """An artifact missed its parity bar; ``metadata`` is the committed model card, or None if nothing was written."""

    def __init__(self, message: str, metadata: dict | None = None):
        super().__init__(message)
        self.metadata = metadata


@dataclass
class ExportJobConfig:
    """``python -m jobs.export``: which checkpoint, which data for calibration/parity, where to write."""

    model: str = ""  # checkpoint folder or finished run folder (local or s3://)
    data: str = ""  # data root (ImageFolder tree or manifest) for calibration and parity images
    output: str = ""  # export folder (local or s3://)
    train_split: str = "train"  # calibration images come from here
    val_split: str = "val"  # parity images come from here
    calibration: int = 128  # number of calibration images for int8
    parity: int = 256  # number of parity images
    int8: bool = True
    torchscript: bool = False
    strict: bool = True  # false: an int8/TorchScript artifact below its bar is kept as validated=false, no error
    name: str = ""  # model-card name (default: kdray-<model_name>)
    version: str = ""  # model-card version (default: the kdray version)


# ----------------------------------------------------------------------------- helpers


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


def ort_session(path: str, threads: int | None = None):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (default: the CPUs available), one inter-op
    thread, sequential execution, all graph optimisations.

    The intra-op threads busy-wait between runs only when the session has every CPU to itself (``threads``
    equals the CPUs available: ``kdray predict``, a single scorer). Spinning then saves a wake-up per call
    (int8, 224 px, 32 images in chunks of 8, interleaved runs on the 2-core box: median 244 vs 201 img/s).
    With fewer threads than CPUs (Ray actors and Serve replicas sharing the node) it would burn cores
    that the neighbours need, so it is off.
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
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise KdrayError(f"{path}: cannot load ONNX model ({str(exc).splitlines()[0][:200]})") from None


def _check_images(images, size: int, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8:
        raise KdrayError(f"{what} images must be uint8 [N, {size}, {size}], got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise KdrayError(f"no {what} images")
    return images


def _batches(images: np.ndarray, batch_size: int = 64):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


@torch.no_grad()
def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return np.concatenate([model(to_model_input(b)).float().numpy() for b in _batches(images)])


def _ort_logits(session, images: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0] for b in _batches(images)])


def _parity(ref_probs: np.ndarray, probs: np.ndarray, labels: np.ndarray | None) -> dict:
    out = {"top1_agreement": float(np.mean(ref_probs.argmax(1) == probs.argmax(1))),
           "max_abs_prob_diff": float(np.max(np.abs(ref_probs - probs))), "n": int(len(probs))}
    if labels is not None:
        out["accuracy"] = float(np.mean(probs.argmax(1) == labels))
    return out


# ----------------------------------------------------------------------------- writing artifacts


class UInt8Input(torch.nn.Module):
    """``model`` behind the preprocessing of :func:`kdray.data.to_model_input`, so that the exported graph
    takes the decoded uint8 images as they are. Doing the scaling and normalisation inside ONNX Runtime
    instead of in torch before it saves a copy and a thread hand-over per call (measured in bench/inference.py).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add that also broadcasts grey to 3 channels: two elementwise
        # passes instead of four. Measured at 224 px, int8, interleaved runs: median 245 vs 209 img/s.
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.unsqueeze(1).float() * self.scale + self.shift)


def export_onnx(model: torch.nn.Module, image_size: int, path: str) -> None:
    """fp32 ONNX, opset 17, uint8 [N, S, S] input with a dynamic batch axis, TorchScript-based exporter
    (no onnxscript needed)."""
    dummy = torch.zeros(2, image_size, image_size, dtype=torch.uint8)
    with torch.no_grad():
        torch.onnx.export(UInt8Input(model.eval()).eval(), (dummy,), path, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_torchscript(model: torch.nn.Module, image_size: int, path: str) -> torch.nn.Module:
    """A traced TorchScript module (for C++/mobile consumers); returns it reloaded from ``path``."""
    with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the portable format here
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            torch.jit.trace(model.eval(), torch.zeros(1, 3, image_size, image_size), check_trace=False).save(path)
        return torch.jit.load(path)


class _ImageReader:
    """onnxruntime CalibrationDataReader over uint8 images, in small batches."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH):
        self.batches = [{INPUT_NAME: np.ascontiguousarray(b)} for b in _batches(images, batch_size)]
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.batches)


def _preprocessing_nodes(model_path: str) -> list[str]:
    """The in-graph preprocessing (every node before the first Conv): it stays fp32, unquantised."""
    import onnx

    nodes = onnx.load(model_path).graph.node
    first_conv = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    return [n.name for n in nodes[:first_conv]]


def quantize_int8(fp32_path: str, int8_path: str, calibration_images: np.ndarray) -> dict:
    """Static int8 (``QUANTIZATION``): ``quant_pre_process`` first, then ``quantize_static``; returns the settings."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("ImageCalibrationReader", (_ImageReader, CalibrationDataReader), {})(calibration_images)
    pre = int8_path + ".pre.onnx"
    quant_pre_process(fp32_path, pre)
    q = QUANTIZATION
    quantize_static(pre, int8_path, reader, quant_format=QuantFormat[q["format"]], per_channel=q["per_channel"],
                    reduce_range=q["reduce_range"], activation_type=QuantType[q["activations"]],
                    weight_type=QuantType[q["weights"]], calibrate_method=CalibrationMethod[q["calibration"]],
                    nodes_to_exclude=_preprocessing_nodes(pre))
    # (not CalibMaxIntermediateOutputs: in onnxruntime 1.32 it discards the collected batches instead of merging them)
    os.remove(pre)
    return {**q, "calibration_images": int(len(calibration_images))}


def _remove_marker(out: storage.Location) -> None:
    marker = out.join(METADATA_FILE)
    if storage.exists(marker):
        marker.fs.delete_file(marker.path)


def export_student(checkpoint_uri: str, output_uri: str, calibration_images: np.ndarray, parity_images: np.ndarray,
                   parity_labels=None, int8: bool = True, torchscript: bool = False,
                   extra_metadata: dict | None = None, strict: bool = True) -> dict:
    """Export a checkpoint to ONNX fp32 (+ int8, + TorchScript), check parity, write the model card last.

    Raises :class:`ParityError` (a :class:`KdrayError`) when an artifact misses its parity bar. If fp32
    fails, nothing is written. If only int8/TorchScript fails, the folder is committed with that artifact
    marked ``validated: false`` (so ``Predictor.load`` falls back to fp32), and the error is still raised
    unless ``strict=False`` (then it is only logged). Returns the metadata dict.
    """
    from kdray.checkpoints import load_model, resolve_checkpoint

    model, meta = load_model(checkpoint_uri)
    size, classes = int(meta["image_size"]), list(meta["classes"])
    parity_images = _check_images(parity_images, size, "parity")
    labels = None if parity_labels is None else np.asarray(parity_labels, dtype=np.int64)
    if labels is not None and len(labels) != len(parity_images):
        raise KdrayError(f"{len(parity_labels)} parity labels for {len(parity_images)} parity images")
    if int8:
        calibration_images = _check_images(calibration_images, size, "calibration")
    temperature = float(meta.get("temperature") or 1.0)
    out = storage.resolve(output_uri)

    with tempfile.TemporaryDirectory(prefix="kdray-export-") as tmp:
        ref_logits = _torch_logits(model, parity_images)
        ref_probs = softmax(ref_logits, temperature)
        files, probs = {}, {}
        files["fp32"] = os.path.join(tmp, FP32_FILE)
        export_onnx(model, size, files["fp32"])
        probs["fp32"] = softmax(_ort_logits(ort_session(files["fp32"]), parity_images), temperature)
        quantization = None
        if int8:
            files["int8"] = os.path.join(tmp, INT8_FILE)
            quantization = quantize_int8(files["fp32"], files["int8"], calibration_images)
            probs["int8"] = softmax(_ort_logits(ort_session(files["int8"]), parity_images), temperature)
        if torchscript:
            files["torchscript"] = os.path.join(tmp, TORCHSCRIPT_FILE)
            probs["torchscript"] = softmax(_torch_logits(export_torchscript(model, size, files["torchscript"]),
                                                         parity_images), temperature)

        parity = {k: _parity(ref_probs, p, labels) for k, p in probs.items()}
        failed = {k: v for k, v in parity.items() if v["top1_agreement"] < PARITY_BARS[k]}
        problems = "; ".join(f"{k} artifact failed parity: top-1 agreement {v['top1_agreement']:.2%} < "
                             f"{PARITY_BARS[k]:.1%} (max |Δp| {v['max_abs_prob_diff']:.4f}, n={v['n']})"
                             for k, v in failed.items())
        if "fp32" in failed:
            raise ParityError(f"{output_uri}: {problems}; nothing written")

        artifacts = {k: {"file": os.path.basename(f), "format": "torchscript" if k == "torchscript" else "onnx",
                         "precision": "int8" if k == "int8" else "fp32", "sha256": sha256_file(f),
                         "size_mb": round(os.path.getsize(f) / 2**20, 3), "validated": k not in failed}
                     for k, f in files.items()}
        if quantization:
            artifacts["int8"]["quantization"] = quantization
        if labels is not None:
            parity["reference"] = {"backend": "torch-fp32", "accuracy": float(np.mean(ref_probs.argmax(1) == labels)),
                                   "n": int(len(labels))}
        metadata = {
            "name": f"kdray-{meta['model_name']}", "version": kdray.__version__,
            "description": "COVID-19 / pneumonia / normal chest X-ray classifier distilled from a "
                           "ResNet50V2+VGG19 teacher into MobileNetV2 (kdray)",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model_name": meta["model_name"], "classes": classes, "image_size": size,
            "input": {"name": INPUT_NAME, "shape": ["batch", size, size], "dtype": "uint8",
                      "note": "decoded grayscale images; scaling, grey-to-RGB and normalisation are in the graph"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "dtype": "float32",
                       "probabilities": "softmax(logits / temperature)"},
            "preprocessing": preprocess_config(size),
            "artifacts": artifacts, "parity": parity, "parity_bars": {k: PARITY_BARS[k] for k in files},
            "metrics": meta.get("metrics", {}), "temperature": temperature,
            "covid_threshold": meta.get("covid_threshold"),
            "training_data": meta.get("training_data"), "validation": meta.get("validation"),
            "calibration": meta.get("calibration"),
            "source_checkpoint": storage.resolve(resolve_checkpoint(checkpoint_uri)).uri,  # absolute
            "intended_use": INTENDED_USE, "known_biases": KNOWN_BIASES,
            "framework": {"kdray": kdray.__version__, "torch": torch.__version__, "onnx_opset": OPSET,
                          **_versions("onnx", "onnxruntime", "numpy")},
        }
        metadata.update(extra_metadata or {})

        _remove_marker(out)  # from here on the old export (if any) is no longer valid
        storage.makedirs(out)
        for f in files.values():
            with open(f, "rb") as fh:
                storage.write_bytes(out.join(os.path.basename(f)), fh.read())
        storage.write_json(out.join(METADATA_FILE), metadata)  # commit marker, last
    if failed and strict:
        raise ParityError(f"{output_uri}: {problems}; recorded as validated=false, the fp32 model is usable", metadata)
    if failed:
        log.warning("%s: %s; recorded as validated=false", output_uri, problems)
    log.info("exported %s to %s: %s", checkpoint_uri, output_uri, {k: parity[k] for k in files})
    return metadata


def _versions(*modules: str) -> dict:
    import importlib

    return {m: getattr(importlib.import_module(m), "__version__", "?") for m in modules}


# ----------------------------------------------------------------------------- loading


class OrtPredictor(Predictor):
    """A :class:`Predictor` over an ONNX Runtime session whose graph takes the uint8 images directly.

    Large batches run as consecutive chunks of ``chunk`` images: at 224 px a chunk's activations stay in
    the CPU caches, which measured ~15% faster than one 32-image call on the 2-core dev box (int8,
    interleaved runs: median 234 vs 204 img/s). Results are identical; the chunks are independent.
    """

    def __init__(self, session, metadata: dict, backend: str, model_id: str = "", chunk: int = ORT_CHUNK):
        super().__init__(metadata["classes"], metadata["image_size"], backend, metadata.get("temperature") or 1.0,
                         metadata.get("covid_threshold"), model_id)
        self.session, self.metadata, self.chunk = session, metadata, max(1, int(chunk))

    def logits(self, images, augment: AugmentConfig | None = None, seeds=None) -> np.ndarray:
        if augment is not None and augment.enabled:
            raise KdrayError(f"{self.backend}: augmented views need the torch backend (a training checkpoint)")
        x = np.ascontiguousarray(self.check_input(images), dtype=np.uint8)
        if len(x) <= self.chunk:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return np.concatenate([self.session.run([OUTPUT_NAME], {INPUT_NAME: c})[0] for c in _batches(x, self.chunk)])


def read_metadata(uri: str) -> dict:
    """The export's model card, or a clear error if it is missing or not a valid card."""
    loc = storage.resolve(storage.join(uri, METADATA_FILE))
    if not storage.exists(loc):
        raise KdrayError(f"{uri}: not an exported model ({METADATA_FILE} missing; run jobs.export)")
    try:
        metadata = json.loads(storage.read_bytes(loc))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KdrayError(f"{loc.uri}: corrupt model card ({exc})") from None
    missing = [k for k in ("classes", "image_size", "artifacts") if not isinstance(metadata, dict) or k not in metadata]
    if missing:
        raise KdrayError(f"{loc.uri}: not a kdray model card (missing {', '.join(missing)})")
    if not isinstance(metadata["classes"], list) or len(metadata["classes"]) < 2:
        raise KdrayError(f"{loc.uri}: 'classes' must list at least 2 class names")
    if not isinstance(metadata["artifacts"], dict):
        raise KdrayError(f"{loc.uri}: 'artifacts' must map artifact kinds to files")
    return metadata


def _choose(uri: str, metadata: dict, backend: str) -> str:
    artifacts = metadata["artifacts"]
    ok = lambda k: isinstance(artifacts.get(k), dict) and artifacts[k].get("validated") is True  # noqa: E731
    if backend in ONNX_BACKENDS:
        kind = ONNX_BACKENDS[backend]
        if kind not in artifacts:
            raise KdrayError(f"{uri}: the export has no {kind} model (artifacts: {', '.join(artifacts) or 'none'})")
        if not ok(kind):
            raise KdrayError(f"{uri}: the {kind} model failed its parity check at export (validated=false)")
        return backend
    if backend == "auto":
        for kind in ("int8", "fp32"):
            if ok(kind):
                return f"onnx-{kind}"
    return "torch"


def _verified_local_file(uri: str, entry: dict, cache_root: str) -> str:
    """A local copy of an artifact (downloaded if on S3) whose sha256 matches the model card."""
    if not entry.get("sha256"):
        raise KdrayError(f"{uri}: model card artifact entry {entry.get('file')!r} has no sha256")
    file_uri = storage.join(uri, entry["file"])
    path = storage.local_copy(file_uri, cache_root)
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise KdrayError(f"{file_uri}: sha256 {digest[:12]}… does not match the model card's "
                         f"{str(entry['sha256'])[:12]}… (corrupt or replaced file)")
    return path


def load_exported(uri: str, backend: str = "auto", threads: int | None = None) -> Predictor:
    """A predictor for an export folder: int8 ORT if validated, else fp32 ORT, else the source checkpoint (torch)."""
    metadata = read_metadata(uri)
    for kind, entry in metadata["artifacts"].items():  # every listed file must be there
        if not isinstance(entry, dict) or not entry.get("file"):
            raise KdrayError(f"{uri}: model card artifact {kind!r} is incomplete")
        if not storage.exists(storage.join(uri, entry["file"])):
            raise KdrayError(f"{storage.join(uri, entry['file'])}: artifact listed in {METADATA_FILE} is missing")
    chosen = _choose(uri, metadata, backend)
    if chosen == "torch":
        return _torch_fallback(uri, metadata, threads)
    cache_root = os.path.join(tempfile.gettempdir(), "kdray-export-cache")
    path = _verified_local_file(uri, metadata["artifacts"][ONNX_BACKENDS[chosen]], cache_root)
    session = ort_session(path, threads)
    out_shape = session.get_outputs()[0].shape
    in_shape = session.get_inputs()[0].shape
    if len(out_shape) != 2 or out_shape[1] != len(metadata["classes"]):
        raise KdrayError(f"{uri}: {os.path.basename(path)} outputs {out_shape[-1]} scores but the model card lists "
                         f"{len(metadata['classes'])} classes {metadata['classes']}")
    if len(in_shape) != 3 or list(in_shape[1:]) != [int(metadata["image_size"]), int(metadata["image_size"])]:
        raise KdrayError(f"{uri}: {os.path.basename(path)} expects input {in_shape}, but the model card says "
                         f"image_size {metadata['image_size']}")
    log.info("loaded %s (%s) from %s", metadata.get("name", "model"), chosen, uri)
    sha = metadata["artifacts"][ONNX_BACKENDS[chosen]]["sha256"]
    return OrtPredictor(session, metadata, chosen, model_id=f"{storage.resolve(uri).uri}#{chosen}:{sha[:12]}")


def _torch_fallback(uri: str, metadata: dict, threads: int | None) -> Predictor:
    from kdray.runtime import TorchPredictor

    source = metadata.get("source_checkpoint")
    if not source:
        raise KdrayError(f"{uri}: no validated ONNX model and no source checkpoint to fall back on")
    try:
        predictor = TorchPredictor.from_checkpoint(source, threads)
    except KdrayError as exc:
        raise KdrayError(f"{uri}: no validated ONNX model, and the source checkpoint cannot be loaded "
                         f"({exc})") from None
    if predictor.classes != list(metadata["classes"]):
        raise KdrayError(f"{uri}: source checkpoint classes {predictor.classes} differ from the model card's "
                         f"{metadata['classes']}")
    predictor.temperature = float(metadata.get("temperature") or predictor.temperature)
    predictor.covid_threshold = metadata.get("covid_threshold", predictor.covid_threshold)
    return predictor
