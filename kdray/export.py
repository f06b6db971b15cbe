"""Export a trained student: ONNX fp32 and static int8, parity checks, the served operating point,
and the model card. (Reading an export back is :mod:`kdray.predictor`.)

An export folder (local or ``s3://``) holds::

    model.fp32.onnx        opset 17, input ``images`` uint8 [N, S, S] (grayscale; the scaling, the
                           grey-to-RGB repeat and the ImageNet normalisation run inside the graph),
                           output ``logits`` [N, C]
    model.int8.onnx        the same graph statically quantised (QDQ, per-channel weights), if requested
    model.torchscript.pt   a traced TorchScript module, if requested
    model.weights.pt       the student's torch state_dict (``torch.load(..., weights_only=True)``), which
                           Grad-CAM explanations run on (:mod:`kdray.explain`); its sha256 is in the card
    metadata.json          the model card (:class:`kdray.schemas.ModelCard`); written LAST, it is the
                           folder's commit marker. The sha256 of its bytes pins the export:
                           ``<folder>@sha256:<digest>`` (:func:`pinned_reference`, printed by jobs.export)

Artifacts are plain file names inside the folder; the card also records the sha256 of the source
checkpoint's weights (``source_checkpoint_sha256``), which the torch backend of the export is checked against.

The order of decisions:

1. Every artifact is compared with the fp32 torch model on the labelled val images: top-1
   agreement must reach its bar (``PARITY_BARS``).
2. For each ONNX artifact that passed, the temperature and the covid threshold are fitted on
   *that artifact's own logits* over the same images (:func:`kdray.metrics.calibration_report`).
3. At that operating point, ``covid_suspect`` from the artifact must agree with the torch model's
   at the same temperature and threshold on at least ``COVID_SUSPECT_BAR`` of the images, or the
   artifact is not validated.
4. The served artifact is int8 if it is validated, else fp32. Its operating point is the one
   scoring and serving use; the card records every artifact's.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import tempfile
import warnings

import numpy as np
import torch

import kdray
from kdray import KdrayError, storage
from kdray.checkpoints import LoadedCheckpoint, load_checkpoint
from kdray.config import ExportJobConfig  # noqa: F401 - its config, with the others in kdray.config
from kdray.data import IMAGENET_MEAN, IMAGENET_STD, preprocess_config, to_model_input
from kdray.metrics import calibration_report, covid_index, covid_suspect, softmax
from kdray.pinning import ModelRef, sha256_hex
from kdray.predictor import INPUT_NAME, MODEL_CARD_FILE, OUTPUT_NAME, batches, ort_session, sha256_file
from kdray.schemas import (
    MODEL_CARD_SCHEMA_VERSION,
    Artifact,
    ModelCard,
    NetworkDataFormat,
    OperatingPoint,
    Parity,
    TensorSpec,
    TorchWeights,
    Versions,
    dump,
)

log = logging.getLogger(__name__)

FP32_FILE, INT8_FILE, TORCHSCRIPT_FILE = "model.fp32.onnx", "model.int8.onnx", "model.torchscript.pt"
TORCH_WEIGHTS_FILE = "model.weights.pt"  # the student's state_dict, for explanations (kdray.explain)
OPSET = 17
# minimum top-1 agreement with the fp32 torch model, per artifact
PARITY_BARS = {"fp32": 0.995, "int8": 0.99, "torchscript": 0.995}
# minimum agreement of covid_suspect with the torch model at the artifact's own operating point
COVID_SUSPECT_BAR = 0.99
# The fitted threshold is, by construction, one image's P(covid). Where torch's own P(covid) is this close to
# the threshold, float noise (fp32 ONNX and torch differ by ~1e-7 to 1e-6) decides the side, not the artifact,
# so that image counts as agreeing; otherwise one such image would fail an fp32 export on a val set of < 100.
ON_THRESHOLD = 1e-5
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
# Static int8 settings. U8 activations x S8 weights is ORT's fast x86 kernel. reduce_range (7-bit weights) is
# on because on CPUs without VNNI the U8S8 kernel's 16-bit intermediate sums saturate (docs/architecture.md).
QUANTIZATION = {"format": "QDQ", "activations": "QUInt8", "weights": "QInt8", "per_channel": True,
                "reduce_range": True, "calibration": "MinMax"}


class ParityError(KdrayError):
    """An artifact missed its parity bar; ``metadata`` is the committed model card, or None if nothing was written."""

    def __init__(self, message: str, metadata: ModelCard | None = None):
        super().__init__(message)
        self.metadata = metadata


# ----------------------------------------------------------------------------- helpers


def _check_images(images, size: int, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8:
        raise KdrayError(f"{what} images must be uint8 [N, {size}, {size}], got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise KdrayError(f"no {what} images")
    return images


@torch.no_grad()
def _torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    return np.concatenate([model(to_model_input(b)).float().numpy() for b in batches(images)])


def _ort_logits(session, images: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0] for b in batches(images)])


def _parity(ref_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> Parity:
    """Top-1 agreement, largest probability gap (at T = 1) and accuracy of an artifact against torch."""
    ref_probs, probs = softmax(ref_logits), softmax(logits)
    return Parity(n=len(logits), top1_agreement=float(np.mean(ref_probs.argmax(1) == probs.argmax(1))),
                  max_abs_prob_diff=float(np.max(np.abs(ref_probs - probs))),
                  accuracy=float(np.mean(probs.argmax(1) == labels)))


def fit_operating_point(kind: str, logits: np.ndarray, labels: np.ndarray, classes: list[str],
                        target_sensitivity: float, split: str) -> OperatingPoint:
    """Temperature and covid threshold fitted on one artifact's own logits."""
    report = calibration_report(labels, logits, classes, target_sensitivity)
    return OperatingPoint(artifact=kind, split=split, n=report.n, temperature=report.temperature,
                          covid_threshold=report.covid_threshold, target_sensitivity=target_sensitivity,
                          ece_before=report.ece_before, ece_after=report.ece_after,
                          covid_at_threshold=report.covid_at_threshold, cross_fitted=report.cross_fitted)


def covid_suspect_agreement(ref_logits: np.ndarray, logits: np.ndarray, classes: list[str],
                            op: OperatingPoint) -> float | None:
    """Share of images on which the artifact and torch agree on covid_suspect at the artifact's operating point
    (an image whose torch P(covid) is within :data:`ON_THRESHOLD` of the threshold agrees either way)."""
    ref_probs = softmax(ref_logits, op.temperature)
    ref = covid_suspect(ref_probs, classes, op.covid_threshold)
    got = covid_suspect(softmax(logits, op.temperature), classes, op.covid_threshold)
    if ref is None or got is None:
        return None
    on_threshold = np.abs(ref_probs[:, covid_index(classes)] - op.covid_threshold) <= ON_THRESHOLD
    return float(np.mean((ref == got) | on_threshold))


# ----------------------------------------------------------------------------- writing artifacts


class UInt8Input(torch.nn.Module):
    """``model`` behind the preprocessing of :func:`kdray.data.to_model_input`, so that the exported graph
    takes the decoded uint8 images as they are. Doing the scaling and normalisation inside ONNX Runtime
    instead of in torch before it saves a copy and a thread hand-over per call (docs/architecture.md).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add that also broadcasts grey to 3 channels: two elementwise
        # passes instead of four (docs/architecture.md, "Measured choices")
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
        self.batches = [{INPUT_NAME: np.ascontiguousarray(b)} for b in batches(images, batch_size)]
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


def export_student(checkpoint_uri: str, output_uri: str, calibration_images: np.ndarray, val_images: np.ndarray,
                   val_labels, int8: bool = True, torchscript: bool = False, extra_metadata: dict | None = None,
                   strict: bool = True, target_sensitivity: float = 0.95, split: str = "val") -> ModelCard:
    """Export a checkpoint to ONNX fp32 (+ int8, + TorchScript), validate, fit the served operating point,
    write the model card last.

    ``val_images``/``val_labels``: labelled held-out images for the parity checks and the operating point.
    Raises :class:`ParityError` (a :class:`KdrayError`) when an artifact misses a bar. If fp32 fails, nothing
    is written. If only int8/TorchScript fails, the folder is committed with that artifact marked
    ``validated: false`` (fp32 is served), and the error is still raised unless ``strict=False``.
    """
    source = load_checkpoint(checkpoint_uri)
    model, meta = source.model, source.meta
    size, classes = meta.image_size, meta.classes
    val_images = _check_images(val_images, size, "validation")
    labels = np.asarray(val_labels, dtype=np.int64)
    if len(labels) != len(val_images):
        raise KdrayError(f"{len(labels)} labels for {len(val_images)} validation images")
    if int8:
        calibration_images = _check_images(calibration_images, size, "calibration")
    out = storage.resolve(output_uri)

    with tempfile.TemporaryDirectory(prefix="kdray-export-") as tmp:
        ref_logits = _torch_logits(model, val_images)
        files, logits = {"fp32": os.path.join(tmp, FP32_FILE)}, {}
        export_onnx(model, size, files["fp32"])
        logits["fp32"] = _ort_logits(ort_session(files["fp32"]), val_images)
        quantization = None
        if int8:
            files["int8"] = os.path.join(tmp, INT8_FILE)
            quantization = quantize_int8(files["fp32"], files["int8"], calibration_images)
            logits["int8"] = _ort_logits(ort_session(files["int8"]), val_images)
        if torchscript:
            files["torchscript"] = os.path.join(tmp, TORCHSCRIPT_FILE)
            logits["torchscript"] = _torch_logits(export_torchscript(model, size, files["torchscript"]), val_images)

        parity = {k: _parity(ref_logits, v, labels) for k, v in logits.items()}
        problems = {k: f"top-1 agreement {p.top1_agreement:.2%} < {PARITY_BARS[k]:.1%} "
                       f"(max |Δp| {p.max_abs_prob_diff:.4f}, n={p.n})"
                    for k, p in parity.items() if p.top1_agreement < PARITY_BARS[k]}
        operating_points = {}
        for kind in ("fp32", "int8"):
            if kind not in logits or kind in problems:
                continue
            op = fit_operating_point(kind, logits[kind], labels, classes, target_sensitivity, split)
            agreement = covid_suspect_agreement(ref_logits, logits[kind], classes, op)
            parity[kind].covid_suspect_agreement = agreement
            if agreement is not None and agreement < COVID_SUSPECT_BAR:
                problems[kind] = (f"covid_suspect agrees with torch on {agreement:.2%} < {COVID_SUSPECT_BAR:.0%} "
                                  f"of {len(labels)} images at its threshold {op.covid_threshold:.4g}")
            else:
                operating_points[kind] = op
        message = "; ".join(f"{k} artifact failed parity: {v}" for k, v in problems.items())
        if "fp32" in problems:
            raise ParityError(f"{output_uri}: {message}; nothing written")

        artifacts = {k: Artifact(file=os.path.basename(f), format="torchscript" if k == "torchscript" else "onnx",
                                 precision="int8" if k == "int8" else "fp32", sha256=sha256_file(f),
                                 size_mb=round(os.path.getsize(f) / 2**20, 3), validated=k not in problems,
                                 quantization=quantization if k == "int8" else None)
                     for k, f in files.items()}
        served = "int8" if "int8" in operating_points else "fp32"
        files["weights"] = os.path.join(tmp, TORCH_WEIGHTS_FILE)
        torch.save(model.state_dict(), files["weights"])
        weights = TorchWeights(file=TORCH_WEIGHTS_FILE, sha256=sha256_file(files["weights"]),
                               size_mb=round(os.path.getsize(files["weights"]) / 2**20, 3), model_name=meta.model_name)
        card = _model_card(meta, source, artifacts, weights, served, parity, operating_points,
                           {"backend": "torch-fp32", "n": int(len(labels)), "split": split,
                            "accuracy": float(np.mean(ref_logits.argmax(1) == labels))}, extra_metadata)

        storage.delete_file(out.join(MODEL_CARD_FILE))  # from here on the old export (if any) is no longer valid
        storage.makedirs(out)
        for f in files.values():
            with open(f, "rb") as fh:
                storage.write_bytes(out.join(os.path.basename(f)), fh.read())
        storage.write_bytes(out.join(MODEL_CARD_FILE), card_bytes(card))  # commit marker, last
    if problems and strict:
        raise ParityError(f"{output_uri}: {message}; recorded as validated=false, {served} is served", card)
    if problems:
        log.warning("%s: %s; recorded as validated=false, %s is served", output_uri, message, served)
    log.info("exported %s to %s: serving %s (T %.3f, covid threshold %s)", checkpoint_uri, output_uri, served,
             operating_points[served].temperature, operating_points[served].covid_threshold)
    return card


def card_bytes(card: ModelCard) -> bytes:
    """``metadata.json`` as export writes it: the bytes whose sha256 pins the export."""
    return (json.dumps(dump(card), indent=2) + "\n").encode()


def pinned_reference(output_uri: str, card: ModelCard) -> str:
    """``<output_uri>@sha256:<digest of metadata.json>``: the export as written, and only as written."""
    return str(ModelRef(storage.resolve(output_uri).uri, sha256_hex(card_bytes(card))))


def _model_card(meta, source: LoadedCheckpoint, artifacts: dict, weights: TorchWeights, served: str, parity: dict,
                operating_points: dict, reference: dict, extra: dict | None) -> ModelCard:
    size, classes = meta.image_size, meta.classes
    fields = dict(
        schema_version=MODEL_CARD_SCHEMA_VERSION, name=f"kdray-{meta.model_name}", version=kdray.__version__,
        description="COVID-19 / pneumonia / normal chest X-ray classifier distilled from a ResNet50V2+VGG19 "
                    "teacher into MobileNetV2 (kdray)",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model_name=meta.model_name, classes=classes, image_size=size,
        network_data_format=NetworkDataFormat(
            inputs={"image": TensorSpec(type="image", format="grayscale", dtype="uint8", shape=[-1, size, size],
                                        name=INPUT_NAME, note="decoded grayscale images; scaling, grey-to-RGB and "
                                                              "normalisation are in the graph")},
            outputs={"pred": TensorSpec(type="logits", format="classes", dtype="float32",
                                        shape=[-1, len(classes)], name=OUTPUT_NAME,
                                        note="probabilities = softmax(logits / T) with the artifact's operating "
                                             "point")}),
        preprocessing=preprocess_config(size), artifacts=artifacts, served_artifact=served, parity=parity,
        parity_bars={**{k: PARITY_BARS[k] for k in artifacts}, "covid_suspect": COVID_SUSPECT_BAR},
        parity_reference=reference, operating_points=operating_points, eval_metrics=meta.metrics,
        validation=meta.validation, data_source=meta.training_data,
        source_checkpoint=storage.resolve(source.folder).uri,  # absolute
        source_checkpoint_sha256=source.sha256,  # of the very weights exported
        torch_weights=weights,
        intended_use=INTENDED_USE, known_biases=KNOWN_BIASES,
        versions=Versions(kdray=kdray.__version__, torch=torch.__version__, onnx_opset=OPSET,
                          **{m: getattr(importlib.import_module(m), "__version__", "?")
                             for m in ("onnx", "onnxruntime", "numpy")}))
    return ModelCard(**{**fields, **(extra or {})})  # extra (name, version, ...) overrides the defaults
