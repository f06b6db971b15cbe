"""One predictor over ONNX Runtime or torch, shared by the logit cache, evaluation, scoring and serving.

``Predictor.load(uri)`` accepts a training checkpoint (or run folder) — torch — or an
exported model folder (``metadata.json`` + ONNX files) — ONNX Runtime by default, int8
first, then fp32, then torch, whichever validated artifact exists.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kdray import KdrayError, storage
from kdray.config import AugmentConfig
from kdray.data import to_model_input
from kdray.evaluate import softmax

log = logging.getLogger(__name__)
METADATA_FILE = "metadata.json"
BACKENDS = ("auto", "onnx-int8", "onnx-fp32", "torch")


class Predictor:
    """Maps uint8 [N, S, S] grayscale images to logits / probabilities for ``classes``."""

    def __init__(self, classes: list[str], image_size: int, backend: str, temperature: float = 1.0,
                 covid_threshold: float | None = None, model_id: str = ""):
        self.classes, self.image_size, self.backend = list(classes), int(image_size), backend
        self.temperature, self.covid_threshold, self.model_id = float(temperature), covid_threshold, model_id

    # -- construction
    @staticmethod
    def load(uri: str, backend: str = "auto", threads: int | None = None, device: str | None = None) -> "Predictor":
        if backend not in BACKENDS:
            raise KdrayError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if storage.exists(storage.join(uri, METADATA_FILE)):
            from kdray.export import load_exported

            return load_exported(uri, backend, threads)
        if backend.startswith("onnx"):
            raise KdrayError(f"{uri}: backend {backend} needs an exported model folder (run jobs.export)")
        return TorchPredictor.from_checkpoint(uri, threads, device)

    # -- inference
    def logits(self, images: np.ndarray, augment: AugmentConfig | None = None, seeds=None) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return softmax(self.logits(images), self.temperature)

    def check_input(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[1:] != (self.image_size, self.image_size):
            raise KdrayError(f"expected uint8 images of shape [N, {self.image_size}, {self.image_size}], "
                             f"got {images.shape}")
        return images


class TorchPredictor(Predictor):
    def __init__(self, model: torch.nn.Module, meta: dict, threads: int | None = None, device: str | None = None,
                 model_id: str = ""):
        super().__init__(meta["classes"], meta["image_size"], "torch", meta.get("temperature", 1.0),
                         meta.get("covid_threshold"), model_id)
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.meta = meta

    @classmethod
    def from_checkpoint(cls, uri: str, threads: int | None = None, device: str | None = None) -> "TorchPredictor":
        from kdray.checkpoints import load_model, resolve_checkpoint

        model, meta = load_model(uri)
        return cls(model, meta, threads, device, model_id=resolve_checkpoint(uri))

    @torch.no_grad()
    def logits(self, images, augment: AugmentConfig | None = None, seeds=None) -> np.ndarray:
        x = to_model_input(self.check_input(images), augment, seeds, self.device)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model(x).float().cpu().numpy()


class LogitsActor:
    """Ray Data actor: the model's logits for each decoded image, for one or more seeded views.

    Output rows: image_id, label, view, logits (list<float32>) and, if present, source.
    """

    def __init__(self, model_uri: str, views: int = 1, augment: dict | None = None, threads: int = 1,
                 backend: str = "auto"):
        from kdray.config import from_dict

        self.predictor = Predictor.load(model_uri, backend=backend, threads=threads)
        self.views = views
        self.augment = from_dict(AugmentConfig, augment) if augment else AugmentConfig()

    def __call__(self, batch: dict):
        import pyarrow as pa

        from kdray.data import view_seeds

        ids = list(batch["image_id"])
        tables = []
        for view in range(self.views):
            seeds = view_seeds(ids, [view] * len(ids))
            logits = self.predictor.logits(batch["image"], self.augment if view else None, seeds)
            columns = {"image_id": pa.array(ids, pa.string()), "label": pa.array(batch["label"], pa.int64()),
                       "view": pa.array([view] * len(ids), pa.int32()),
                       "logits": pa.array(list(logits.astype(np.float32)), pa.list_(pa.float32()))}
            if "source" in batch:
                columns["source"] = pa.array([str(s) for s in batch["source"]], pa.string())
            tables.append(pa.table(columns))
        return pa.concat_tables(tables)


def actor_pool(use_gpu: bool = False):
    """(compute strategy, per-actor resources, threads) sized from the cluster, leaving room for reads.

    On a small CPU box every actor asks for half a CPU: a pool that takes every CPU starves the
    read and decode tasks that feed it and hangs Ray Data.
    """
    from ray.data import ActorPoolStrategy

    from kdray.raycluster import cluster_cpus, cluster_gpus

    gpus = int(cluster_gpus())
    if use_gpu and gpus:
        return ActorPoolStrategy(min_size=1, max_size=gpus), {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = cluster_cpus()
    size = max(1, int(cpus) // 2) if cpus >= 8 else max(1, int(cpus))
    per_actor = 0.5 if cpus < 8 else 2.0
    threads = max(1, int(per_actor))
    return ActorPoolStrategy(min_size=1, max_size=size), {"num_cpus": per_actor}, threads


def run_logits(ds, model_uri: str, views: int = 1, augment: dict | None = None, batch_size: int = 32,
               backend: str = "auto", use_gpu: bool = True):
    """Map a decoded dataset to per-view logits with an actor pool; returns a pyarrow Table."""
    import pyarrow as pa
    import ray

    compute, resources, threads = actor_pool(use_gpu)
    out = ds.map_batches(LogitsActor, fn_constructor_kwargs={"model_uri": model_uri, "views": views,
                                                             "augment": augment, "threads": threads,
                                                             "backend": backend},
                         batch_size=batch_size, batch_format="numpy", compute=compute, **resources)
    tables = [t for t in ray.get(out.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else None



def measure_throughput(predictor: Predictor, images: np.ndarray, batch_size: int = 32, min_seconds: float = 2.0) -> float:
    """Images per second of ``predictor.logits`` on ``images`` in batches (after one warm-up batch)."""
    import time

    predictor.logits(images[:batch_size])
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds or done == 0:
        for i in range(0, len(images), batch_size):
            done += len(predictor.logits(images[i:i + batch_size]))
    return round(done / (time.perf_counter() - started), 2)
