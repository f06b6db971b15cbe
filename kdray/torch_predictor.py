"""The torch predictor: a training checkpoint run in torch (channels_last and bf16 autocast on a GPU).

Apart from :mod:`kdray.predictor` so that the ONNX path (scoring, serving, ``kdray predict``) never imports torch.
"""

from __future__ import annotations

import numpy as np
import torch

from kdray.checkpoints import load_checkpoint
from kdray.config import AugmentConfig
from kdray.data import to_model_input
from kdray.pinning import model_id
from kdray.predictor_base import Predictor


CHECKPOINT_VERSION = "checkpoint"  # the version in a training checkpoint's model_id (it has no model card)


class TorchPredictor(Predictor):
    """A training checkpoint in torch: channels_last and bf16 autocast on a GPU, fp32 on the CPU."""

    def __init__(self, model: torch.nn.Module, classes: list[str], image_size: int, temperature: float = 1.0,
                 covid_threshold: float | None = None, threads: int | None = None, device: str | None = None,
                 model_id: str = ""):
        super().__init__(classes, image_size, "torch", temperature, covid_threshold, model_id)
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, uri: str, threads: int | None = None, device: str | None = None,
                        expected_sha256: str | None = None) -> "TorchPredictor":
        """The checkpoint's model with its own calibration; ``model_id`` is its name and weights digest
        (``kdray-student:checkpoint@sha256:…#torch``), not its folder."""
        loaded = load_checkpoint(uri, expected_sha256)
        meta = loaded.meta
        return cls(loaded.model, meta.classes, meta.image_size, meta.temperature, meta.covid_threshold, threads,
                   device, model_id=model_id(f"kdray-{meta.model_name}", CHECKPOINT_VERSION, loaded.sha256, "torch"))

    @torch.no_grad()
    def logits(self, images, augment: AugmentConfig | None = None, seeds=None) -> np.ndarray:
        x = to_model_input(self.check_input(images), augment, seeds, self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model(x).float().cpu().numpy()
