"""Offline scoring of image archives with Ray Data: every image under a folder or S3 prefix.

Output (under ``--output``):
- ``predictions/*.parquet``: path, label (predicted), p_<class> per class, covid_suspect, model_id, backend
- ``errors/*.parquet``: path, reason — one row per unreadable image (never a crash)
- ``summary.json``: counts, throughput and the resolved settings; written last, it marks the output complete.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from kdray import KdrayError, storage
from kdray.batch import actor_pool
from kdray.data import IMAGE_EXTENSIONS, DecodeBatch
from kdray.predictor import Predictor, model_info
from kdray.raycluster import init_ray

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


class ScoreActor:
    """Ray Data actor: decoded images → class probabilities with the shared predictor."""

    def __init__(self, model_uri: str, backend: str = "auto", threads: int = 1):
        self.predictor = Predictor.load(model_uri, backend=backend, threads=threads)

    def __call__(self, batch: dict) -> pa.Table:
        p = self.predictor
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        probs = np.full((len(ok), len(p.classes)), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = p.probabilities(batch["image"][ok])
        columns = {"path": pa.array([str(x) for x in batch["path"]], pa.string()),
                   "label": pa.array([p.classes[i] if good else None for i, good in zip(probs.argmax(1), ok)],
                                     pa.string())}
        for k, name in enumerate(p.classes):
            columns[f"p_{name}"] = pa.array(probs[:, k], pa.float32())
        suspect = p.covid_suspect(probs)
        if suspect is not None:
            columns["covid_suspect"] = pa.array([bool(s) if good else None for s, good in zip(suspect, ok)], pa.bool_())
        columns["model_id"] = pa.array([p.model_id] * len(ok), pa.string())
        columns["backend"] = pa.array([p.backend] * len(ok), pa.string())
        columns["error"] = pa.array([str(e) for e in batch["error"]], pa.string())
        return pa.table(columns)


def list_archive(input_uri: str) -> tuple[object, list[str]]:
    """All image files under a folder or prefix (recursive)."""
    loc = storage.resolve(input_uri)
    files = [f.path for f in storage.list_files(loc) if f.path.lower().endswith(IMAGE_EXTENSIONS)
             and not f.base_name.startswith(".")]
    if not files:
        raise KdrayError(f"{input_uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return loc.fs, files


def score_archive(model_uri: str, input_uri: str, output_uri: str, backend: str = "auto", batch_size: int = 32,
                  overwrite: bool = False) -> dict:
    import ray

    if storage.exists(storage.join(output_uri, SUMMARY_FILE)) and not overwrite:
        raise KdrayError(f"{output_uri} already holds a finished scoring run; choose another --output "
                         "or pass --overwrite true")
    info = model_info(model_uri, backend)
    fs, files = list_archive(input_uri)
    init_ray()
    out_loc = storage.resolve(output_uri)
    storage.makedirs(out_loc)
    for sub in ("predictions", "errors"):
        storage.delete_dir(out_loc.join(sub))  # a previous, unfinished attempt
    log.info("scoring %d images under %s with %s", len(files), input_uri, model_uri)
    started = time.time()
    compute, resources, threads = actor_pool(use_gpu=False)
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=max(1, min(200, len(files) // 256)))
    ds = ds.map_batches(DecodeBatch(fs, info.image_size), batch_size=batch_size, batch_format="numpy")
    scored = ds.map_batches(ScoreActor, fn_constructor_kwargs={"model_uri": model_uri, "backend": backend,
                                                               "threads": threads},
                            batch_size=batch_size, batch_format="numpy", compute=compute, **resources).materialize()
    predictions = scored.filter(lambda r: r["error"] == "").drop_columns(["error"])
    errors = scored.filter(lambda r: r["error"] != "").select_columns(["path", "error"])
    errors = errors.rename_columns({"error": "reason"})
    n_pred, n_err = predictions.count(), errors.count()
    predictions.write_parquet(out_loc.join("predictions").path, filesystem=out_loc.fs)
    if n_err:
        errors.write_parquet(out_loc.join("errors").path, filesystem=out_loc.fs)
        log.warning("%d image(s) could not be read; see %s", n_err, storage.join(output_uri, "errors"))
    elapsed = time.time() - started
    summary = {"model": model_uri, "input": input_uri, "output": output_uri, "images": len(files),
               "scored": n_pred, "errors": n_err, "wall_s": round(elapsed, 1),
               "img_per_s": round(len(files) / max(elapsed, 1e-9), 2), "backend": info.backend}
    storage.write_json(storage.join(output_uri, SUMMARY_FILE), summary)
    return summary
