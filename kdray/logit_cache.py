"""The teacher's logits, computed once and cached as Parquet.

Layout: ``<output>/logit_cache/<fingerprint[:16]>/logits.parquet`` plus ``cache.json``.
Rows are (image_id, label, view, logits: list<float32>[, source]); view 0 is the clean image,
views 1..K-1 are augmentations with seeds fixed by (image_id, view).

The fingerprint hashes the teacher's weights, the data listing (image ids and labels) and the
preprocessing (size, views, augmentation). It is stored in the Parquet schema metadata and in
``cache.json``; ``cache.json`` is written last and marks the cache complete, so a reader never
sees half a cache. Opening a cache whose fingerprint does not match the data and
preprocessing at hand is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kdray import KdrayError, storage
from kdray.batch import run_logits
from kdray.checkpoints import resolve_checkpoint, weights_digest
from kdray.config import AugmentConfig, KDConfig, to_dict
from kdray.data import Listing, TrainingData, load_split
from kdray.images import DECODER_VERSION
from kdray.raycluster import init_ray

log = logging.getLogger(__name__)
DATA_FILE, SIDECAR_FILE = "logits.parquet", "cache.json"
FINGERPRINT_KEY = b"kdray.fingerprint"


def preprocessing_key(image_size: int, views: int, augment: AugmentConfig) -> dict:
    return {"image_size": image_size, "views": views, "augment": to_dict(augment) if views > 1 else None,
            "decoder": DECODER_VERSION}


def fingerprint(teacher_digest: str, listing_signature: str, preprocessing: dict) -> str:
    blob = json.dumps({"teacher": teacher_digest, "data": listing_signature, "preprocessing": preprocessing},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_location(output: str, fp: str) -> str:
    return storage.join(output, "logit_cache", fp[:16])


@dataclass
class LogitCache:
    uri: str
    fingerprint: str
    meta: dict
    table: pa.Table

    @property
    def views(self) -> int:
        return int(self.meta["preprocessing"]["views"])

    def lookup(self) -> dict[str, np.ndarray]:
        """image_id → float32 [views, classes]."""
        ids = self.table["image_id"].to_pylist()
        views = np.asarray(self.table["view"].to_numpy())
        logits = np.stack(self.table["logits"].to_numpy(zero_copy_only=False)).astype(np.float32)
        out: dict[str, np.ndarray] = {}
        for image_id, view, row in zip(ids, views, logits):
            out.setdefault(image_id, np.zeros((self.views, logits.shape[1]), np.float32))[view] = row
        return out


def build(teacher_uri: str, listing: Listing, image_size: int, output: str, views: int = 1,
          augment: AugmentConfig | None = None, batch_size: int = 32, decoded=None) -> tuple[str, bool]:
    """Build (or reuse) the cache for ``listing``; returns (cache URI, reused?).

    ``decoded``: ``(dataset, skipped)`` of ``listing`` already decoded at ``image_size`` (else it is decoded here)."""
    augment = augment or AugmentConfig()
    if views < 1:
        raise KdrayError(f"views must be >= 1, got {views}")
    teacher_uri = resolve_checkpoint(teacher_uri)
    prep = preprocessing_key(image_size, views, augment)
    teacher_digest = weights_digest(teacher_uri)
    fp = fingerprint(teacher_digest, listing.signature(), prep)
    uri = cache_location(output, fp)
    sidecar = storage.join(uri, SIDECAR_FILE)
    if storage.exists(sidecar) and storage.read_json(sidecar).get("fingerprint") == fp:
        log.info("reusing logit cache %s (fingerprint %s): no teacher forward pass", uri, fp[:16])
        return uri, True
    log.info("building logit cache %s: teacher %s over %d images x %d view(s)", uri, teacher_uri, len(listing), views)
    started = time.time()
    init_ray()
    ds, skipped = decoded or load_split(listing, image_size)
    table = run_logits(ds, teacher_uri, views, to_dict(augment), batch_size, backend="torch")
    if table is None:
        raise KdrayError("the teacher produced no logits")
    table = table.sort_by([("image_id", "ascending"), ("view", "ascending")])
    meta = {"fingerprint": fp, "teacher": teacher_uri, "teacher_digest": teacher_digest, "data_root": listing.root, "split": listing.split,
            "classes": listing.classes, "listing_signature": listing.signature(), "preprocessing": prep,
            "rows": table.num_rows, "images": table.num_rows // views, "skipped_images": skipped,
            "built_s": round(time.time() - started, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    table = table.replace_schema_metadata({FINGERPRINT_KEY: fp.encode(), b"kdray.meta": json.dumps(meta).encode()})
    storage.write_parquet(storage.join(uri, DATA_FILE), table)
    storage.write_json(sidecar, meta)  # last: marks the cache complete
    log.info("logit cache %s: %d rows in %.0f s", uri, table.num_rows, meta["built_s"])
    return uri, False


def open_cache(uri: str, listing: Listing | None = None, image_size: int | None = None) -> LogitCache:
    """Open a complete cache; if ``listing``/``image_size`` are given, refuse a cache built for other inputs."""
    sidecar = storage.join(uri, SIDECAR_FILE)
    if not storage.exists(sidecar):
        raise KdrayError(f"{uri}: not a complete logit cache (no {SIDECAR_FILE}); build it with jobs.build_cache")
    meta = storage.read_json(sidecar)
    table = storage.read_parquet(storage.join(uri, DATA_FILE))
    stored = (table.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode()
    if stored != meta.get("fingerprint"):
        raise KdrayError(f"{uri}: Parquet fingerprint {stored[:16]} does not match {SIDECAR_FILE} "
                         f"({str(meta.get('fingerprint'))[:16]}); the cache is damaged, rebuild it")
    if listing is not None:
        prep = dict(meta["preprocessing"])
        if image_size is not None:
            prep["image_size"] = image_size
        expected = fingerprint(meta["teacher_digest"], listing.signature(), prep)
        if expected != meta["fingerprint"]:
            what = ("data listing" if listing.signature() != meta["listing_signature"] else "preprocessing")
            raise KdrayError(f"{uri}: logit cache fingerprint {meta['fingerprint'][:16]} does not match this run "
                             f"({expected[:16]}): the {what} differs; rebuild the cache with jobs.build_cache")
    return LogitCache(uri, meta["fingerprint"], meta, table)


def attach_logits(ds, cache: LogitCache, views: int = 0):
    """Add a ``teacher_logits`` column (float32 [views, classes]) to a decoded dataset, joined on image_id.

    ``views`` keeps the first that many cached views (view 0 is the clean image); 0 keeps them all.
    """
    views = views or cache.views
    lookup = {image_id: logits[:views] for image_id, logits in cache.lookup().items()}

    def add(batch: dict) -> dict:
        missing = [i for i in batch["image_id"] if i not in lookup]
        if missing:
            raise KdrayError(f"logit cache {cache.uri} has no logits for {len(missing)} image(s), e.g. {missing[0]}")
        batch["teacher_logits"] = np.stack([lookup[i] for i in batch["image_id"]])
        return batch

    log.info("joining cached teacher logits from %s (%d of its %d view(s)) on image_id", cache.uri, views, cache.views)
    return ds.map_batches(add, batch_format="numpy", batch_size=256).materialize()


def with_teacher_logits(data: TrainingData, kd: KDConfig) -> TrainingData:
    """``data`` with the cached teacher logits joined onto its train split (``kd.cache``, first ``kd.views``).

    The cache must have been built for this very listing; the teacher may have run at another image size."""
    if not kd.cache:
        raise KdrayError("distillation needs --kd.cache (build one with jobs.build_cache)")
    cache = open_cache(kd.cache, data.train_listing)
    views = kd.views or cache.views
    if not 1 <= views <= cache.views:
        raise KdrayError(f"--kd.views {views}: the logit cache {kd.cache} holds {cache.views} view(s) per image")
    return dataclasses.replace(data, train=attach_logits(data.train, cache, views))
