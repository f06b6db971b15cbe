"""Ray Data glue: actor pools sized for the cluster, and the map_batches callables that run a predictor.

On a small CPU box every actor asks for half a CPU: a pool that takes every CPU starves the read
and decode tasks that feed it and hangs Ray Data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kdray.config import AugmentConfig, from_dict
from kdray.data import view_seeds
from kdray.predictor import load_predictor
from kdray.raycluster import cluster_cpus, cluster_gpus
from kdray.runner import kdray_errors_from_ray


class LogitsActor:
    """Ray Data actor: the model's logits for each decoded image, for one or more seeded views.

    Output rows: image_id, label, view, logits (list<float32>) and, if present, source.
    """

    def __init__(self, model_uri: str, views: int = 1, augment: dict | None = None, threads: int = 1,
                 backend: str = "auto"):
        self.predictor = load_predictor(model_uri, backend=backend, threads=threads)
        self.views = views
        self.augment = from_dict(AugmentConfig, augment) if augment else AugmentConfig()

    def __call__(self, batch: dict) -> pa.Table:
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
    """(compute strategy, per-actor resources, threads) sized from the cluster, leaving room for reads."""
    from ray.data import ActorPoolStrategy

    gpus = int(cluster_gpus())
    if use_gpu and gpus:
        return ActorPoolStrategy(min_size=1, max_size=gpus), {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = cluster_cpus()
    size = max(1, int(cpus) // 2) if cpus >= 8 else max(1, int(cpus))
    per_actor = 0.5 if cpus < 8 else 2.0
    threads = max(1, int(per_actor))
    return ActorPoolStrategy(min_size=1, max_size=size), {"num_cpus": per_actor}, threads


def run_logits(ds, model_uri: str, views: int = 1, augment: dict | None = None, batch_size: int = 32,
               backend: str = "auto", use_gpu: bool = True) -> pa.Table | None:
    """Map a decoded dataset to per-view logits with an actor pool; returns a pyarrow Table."""
    import ray

    compute, resources, threads = actor_pool(use_gpu)
    out = ds.map_batches(LogitsActor, fn_constructor_kwargs={"model_uri": model_uri, "views": views,
                                                             "augment": augment, "threads": threads,
                                                             "backend": backend},
                         batch_size=batch_size, batch_format="numpy", compute=compute, **resources)
    with kdray_errors_from_ray():  # an actor that could not load the model (S3 away): one line
        tables = [t for t in ray.get(out.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else None
