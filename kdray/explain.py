"""Grad-CAM explanations of the student's predictions: a heat map and a PNG overlay per image.

One path for the API (``POST /predict?explain=true``, the OIP ``explain`` parameter), the CLI
(``kdray explain``) and batch scoring (``jobs.score --explain``):

* The heat map comes from the ``grad-cam`` library (``pytorch_grad_cam.GradCAM``) on the student's
  **torch** weights, at the last feature block of MobileNetV2 (``features[-1]``). An export folder ships
  those weights (``model.weights.pt``) with their sha256 in the model card (``torch_weights``); a training
  checkpoint can be explained directly.
* It explains the class **the served artifact predicted** (the int8 or fp32 ONNX model, whatever answered),
  passed in as ``classes``. The torch model's own top class comes back beside it (``torch_class``); where the
  two differ, ``agrees`` is false, and the heat map still explains the served class.
* The heat map is float32 ``[S, S]`` (the model's input size), scaled to 0..1 per image by the library; the
  overlay is that map in the JET colour map blended 50/50 with the grey image the model saw (the centre
  crop, resized to ``S``), as PNG.

:func:`border_mass` is the shortcut check of ``bench/explain.py``: the share of heat-map mass in the outer
band of the image (15% of each side by default), where markers, text and borders sit, against the centre.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kdray import KdrayError, first_line
from kdray.checkpoints import load_model
from kdray.data import to_model_input
from kdray.models import build_model
from kdray.predictor import is_export, open_export

log = logging.getLogger(__name__)

TARGET_LAYER = "features[-1]"  # the last block before global pooling: the finest map that still sees classes
EXPLAIN_MODES = ("none", "covid_suspect", "all")
BORDER = 0.15
OVERLAY_IMAGE_WEIGHT = 0.5


@dataclass
class Explanation:
    heatmap: np.ndarray  # float32 [S, S], 0..1
    explained_class: str  # the class the heat map explains: the served prediction's
    torch_class: str  # the torch model's own top class
    overlay_png: bytes
    image: np.ndarray | None = None  # uint8 [S, S]: what the model saw (the API returns it; the viewer shows it)

    @property
    def agrees(self) -> bool:
        return self.explained_class == self.torch_class

    def to_json(self) -> dict:
        """What the API returns beside a prediction."""
        return {"explained_class": self.explained_class, "torch_class": self.torch_class, "agrees": self.agrees,
                "method": "grad-cam", "layer": TARGET_LAYER, "size": int(self.heatmap.shape[0]),
                "overlay_png": base64.b64encode(self.overlay_png).decode("ascii"),
                "image_png": None if self.image is None else base64.b64encode(png_bytes(self.image)).decode("ascii")}


class Explainer:
    """Grad-CAM over a torch student. Thread-safe (one explanation at a time: the library's hooks are shared)."""

    def __init__(self, model: torch.nn.Module, classes: list[str], image_size: int, source: str = "",
                 threads: int | None = None):
        from pytorch_grad_cam import GradCAM

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.model = model.eval()
        self.classes, self.image_size, self.source = list(classes), int(image_size), source
        self.cam = GradCAM(model=self.model, target_layers=[target_layer(self.model)])
        self.lock = threading.Lock()

    @classmethod
    def load(cls, uri: str, threads: int | None = None) -> "Explainer":
        """From an export (a folder or a pinned reference: its ``torch_weights``, loaded from the bytes checked
        against the card's sha256) or a checkpoint."""
        if not is_export(uri):
            model, meta = load_model(uri)
            return cls(model, meta.classes, meta.image_size, uri, threads)
        export = open_export(uri)
        card = export.card
        weights = card.torch_weights
        if weights is None:
            raise KdrayError(f"{export.uri}: the export has no torch weights, which explanations need (exported by "
                             f"an older kdray); run jobs.export again")
        data = export.read_verified(weights.file, weights.sha256)
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            model = build_model(card.model_name, len(card.classes))
            model.load_state_dict(state)
        except (RuntimeError, ValueError, EOFError) as exc:
            raise KdrayError(f"{export.file_uri(weights.file)}: cannot load the torch weights for "
                             f"{card.model_name} ({first_line(exc, 160)})") from None
        log.info("explainer: %s torch weights of %s", card.model_name, export.model_id("torch"))
        return cls(model, card.classes, card.image_size, export.uri, threads)

    def explain(self, images: np.ndarray, classes: list[int] | np.ndarray) -> list[Explanation]:
        """Grad-CAM of ``classes[i]`` (the served prediction) for each uint8 [S, S] image in ``images``."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size) or images.dtype != np.uint8:
            raise KdrayError(f"explain needs uint8 [N, {self.image_size}, {self.image_size}] images, "
                             f"got {images.dtype} {images.shape}")
        if len(classes) != len(images):
            raise KdrayError(f"{len(classes)} classes for {len(images)} images")
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        with self.lock, torch.enable_grad():
            heatmaps = self.cam(input_tensor=to_model_input(images), targets=targets)
            torch_top = self.cam.outputs.detach().argmax(1).tolist()
        return [Explanation(heatmap=np.asarray(h, np.float32), explained_class=self.classes[int(c)],
                            torch_class=self.classes[int(t)], overlay_png=overlay_png(image, h), image=image)
                for image, h, c, t in zip(images, heatmaps, classes, torch_top)]


def target_layer(model: torch.nn.Module) -> torch.nn.Module:
    features = getattr(model, "features", None)
    if not isinstance(features, torch.nn.Sequential) or len(features) == 0:
        raise KdrayError(f"explanations need a student with a 'features' block; {type(model).__name__} has none")
    return features[-1]


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    """The heat map in JET over the grey uint8 image, as PNG bytes."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    blended = show_cam_on_image(rgb, np.clip(heatmap, 0, 1), use_rgb=True, image_weight=OVERLAY_IMAGE_WEIGHT)
    return png_bytes(blended)


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 grey [H, W] or RGB [H, W, 3] array as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def border_mask(size: int, border: float = BORDER) -> np.ndarray:
    """True in the outer band of a ``size``² image: ``border`` of the side on each edge."""
    band = int(round(size * border))
    mask = np.ones((size, size), bool)
    mask[band:size - band, band:size - band] = False
    return mask


def border_mass(heatmap: np.ndarray, border: float = BORDER) -> float:
    """Share of the heat map's mass in the outer band (nan for an all-zero map)."""
    total = float(heatmap.sum())
    if total <= 0:
        return float("nan")
    return float(heatmap[border_mask(heatmap.shape[0], border)].sum()) / total


def should_explain(mode: str, covid_suspect: np.ndarray | None, count: int) -> np.ndarray:
    """Which of ``count`` predictions ``jobs.score --explain MODE`` explains."""
    if mode not in EXPLAIN_MODES:
        raise KdrayError(f"explain must be one of {', '.join(EXPLAIN_MODES)}, got {mode!r}")
    if mode == "all":
        return np.ones(count, bool)
    if mode == "covid_suspect" and covid_suspect is not None:
        return np.asarray(covid_suspect, bool)
    return np.zeros(count, bool)
