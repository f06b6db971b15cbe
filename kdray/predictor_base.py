"""What every predictor is: uint8 [N, S, S] grayscale images in, logits and probabilities out, with the operating
point (temperature, covid threshold) of exactly what it runs. :mod:`kdray.predictor` (ONNX Runtime, and loading)
and :mod:`kdray.torch_predictor` build on it."""

from __future__ import annotations

import numpy as np

from kdray import KdrayError
from kdray.config import AugmentConfig
from kdray.metrics import covid_suspect, softmax


class Predictor:
    """Maps uint8 [N, S, S] grayscale images to logits / probabilities for ``classes``."""

    def __init__(self, classes: list[str], image_size: int, backend: str, temperature: float = 1.0,
                 covid_threshold: float | None = None, model_id: str = ""):
        self.classes, self.image_size, self.backend = list(classes), int(image_size), backend
        self.temperature, self.covid_threshold, self.model_id = float(temperature), covid_threshold, model_id

    def logits(self, images: np.ndarray, augment: AugmentConfig | None = None, seeds=None) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images), self.temperature)

    def covid_suspect(self, probs: np.ndarray) -> np.ndarray | None:
        """P(covid) >= this predictor's threshold, per row; None without a covid class or a threshold."""
        return covid_suspect(probs, self.classes, self.covid_threshold)

    def check_input(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise KdrayError(f"expected uint8 images of shape [N, {self.image_size}, {self.image_size}], "
                             f"got {images.shape}")
        return images
