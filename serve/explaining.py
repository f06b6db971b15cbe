"""Explanations in a replica: the Grad-CAM explainer loaded on first use, one thread, a bounded number in flight.

Predictions never wait for explanations: these run in their own single thread (with ``threads`` torch
threads), and at most ``max_in_flight`` explanation requests, holding at most ``max_images`` images together
(each costs about 93 MB at 224 px), are admitted at once per replica; the next one is refused at once
(:class:`ExplainBusy`, answered 503 + Retry-After), and one with more images than ``max_images`` is refused
outright (:class:`ExplainTooLarge`, answered 400): it could never run. A replica that never gets an
explanation request never loads the torch weights.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydantic import TypeAdapter, ValidationError

from kdray import KdrayError
from kdray.explain import Explainer, Explanation
from serve.oip import TOO_MANY_IMAGES
from serve.options import REQUEST

log = logging.getLogger(__name__)


class ExplainBusy(Exception):
    """Too many explanation requests in flight on this replica."""


class ExplainTooLarge(Exception):
    """An explanation request with more images than a replica explains at once."""

    reason = TOO_MANY_IMAGES


class ExplainUnavailable(KdrayError):
    """This model cannot be explained (e.g. an export without torch weights)."""


_BOOL = TypeAdapter(bool)  # the configs' reading of a bool: true/false, 1/0, yes/no, on/off


def explain_flag(value) -> bool:
    """A query or OIP parameter: true/false (also 1/0, yes/no, on/off), absent or empty = false; anything else
    is a ValueError."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return False
    try:
        return _BOOL.validate_python(value.strip() if isinstance(value, str) else value)
    except ValidationError:
        raise ValueError(f"explain must be true or false, got {str(value)[:40]!r}") from None


def _lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (Linux schedules threads one by one); elsewhere, leave it."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        log.info("explanations run at normal priority (%s)", exc)


class ExplainGate:
    def __init__(self, model_dir: str, max_in_flight: int, threads: int, nice: int = 0,
                 max_images: int = REQUEST.max_explain_images):
        self.model_dir, self.max_in_flight, self.threads = model_dir, int(max_in_flight), int(threads)
        self.max_images, self.images_in_flight = int(max_images), 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdray-explain", initializer=_lower_priority,
                                       initargs=(int(nice),))
        self.in_flight = self.refused = self.explained = 0
        self._explainer: Explainer | None = None
        self._failure: str | None = None
        self._loading = threading.Lock()

    def admit(self, images: int = 1) -> None:
        """Count one explanation request of ``images`` images in, or raise ExplainTooLarge / ExplainBusy;
        pair with :meth:`release` (the same ``images``)."""
        if images > self.max_images:
            self.refused += 1
            raise ExplainTooLarge(f"{images} images to explain; at most {self.max_images} are explained per "
                                  "request: send fewer, or ask without explain")
        if self.in_flight >= self.max_in_flight or self.images_in_flight + images > self.max_images:
            self.refused += 1
            raise ExplainBusy(f"{self.in_flight} explanation request(s) of {self.images_in_flight} image(s) in "
                              "progress on this replica; retry later, or ask without explain")
        self.in_flight += 1
        self.images_in_flight += images

    def release(self, images: int = 1) -> None:
        self.in_flight -= 1
        self.images_in_flight -= images

    async def explain(self, images: np.ndarray, classes: list[int]) -> list[Explanation]:
        """Grad-CAM of the served classes, in the explanation thread."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._explain, images, classes)

    def _explain(self, images: np.ndarray, classes: list[int]) -> list[Explanation]:
        explanations = self._load().explain(images, classes)
        self.explained += len(explanations)
        return explanations

    def _load(self) -> Explainer:
        with self._loading:
            if self._failure is not None:
                raise ExplainUnavailable(self._failure)
            if self._explainer is None:
                try:
                    self._explainer = Explainer.load(self.model_dir, threads=self.threads)
                except KdrayError as exc:
                    self._failure = f"explanations are not available for this model: {exc}"
                    raise ExplainUnavailable(self._failure) from None
            return self._explainer
