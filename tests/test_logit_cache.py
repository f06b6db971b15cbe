"""Logit cache: build with a Ray Data actor pool, reuse, invalidation, refusal of mismatched caches."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdray import KdrayError, logit_cache, storage
from kdray.config import AugmentConfig
from kdray.data import decode_image, list_split
from kdray.predictor import load_predictor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("teacher"), "tiny_teacher", image_size=32, seed=0)


def test_build_reuse_and_invalidate(synthetic_dir, teacher, tmp_path, ray_local, caplog, checkpoint_factory):
    listing = list_split(synthetic_dir, "train", limit=30)
    uri, reused = logit_cache.build(teacher, listing, 32, str(tmp_path), views=1)
    assert not reused
    table = pq.read_table(f"{uri}/logits.parquet")
    assert table.num_rows == 30 and set(table.column_names) >= {"image_id", "label", "view", "logits"}
    logits_type = table.schema.field("logits").type
    assert pa.types.is_list(logits_type) and logits_type.value_type == pa.float32()
    assert table.schema.metadata[b"kdray.fingerprint"].decode() == storage.read_json(f"{uri}/cache.json")["fingerprint"]

    # the cached logits are the teacher's: recompute a few directly
    cache = logit_cache.open_cache(uri, listing, 32)
    lookup = cache.lookup()
    images = np.stack([decode_image(open(p, "rb").read(), 32) for p in listing.paths[:2]])
    direct = load_predictor(teacher).logits(images)
    assert np.allclose(direct[0], lookup[listing.image_ids[0]][0], atol=0.05)

    # same teacher, data and preprocessing: reused, no teacher forward pass, file untouched
    mtime = storage.info(storage.resolve(f"{uri}/logits.parquet")).mtime
    caplog.clear()
    caplog.set_level(logging.INFO, logger="kdray.logit_cache")
    again, reused = logit_cache.build(teacher, listing, 32, str(tmp_path), views=1)
    assert reused and again == uri
    assert "no teacher forward pass" in caplog.text
    assert storage.info(storage.resolve(f"{uri}/logits.parquet")).mtime == mtime

    # a different teacher makes a new cache
    other = checkpoint_factory("other-teacher", model_name="tiny_teacher", image_size=32, seed=1)
    changed, reused = logit_cache.build(other, listing, 32, str(tmp_path), views=1)
    assert not reused and changed != uri


def test_views_and_refusals(synthetic_dir, teacher, tmp_path, ray_local):
    listing = list_split(synthetic_dir, "train", limit=12)
    uri, _ = logit_cache.build(teacher, listing, 32, str(tmp_path), views=3, augment=AugmentConfig())
    cache = logit_cache.open_cache(uri, listing, 32)
    logits = cache.lookup()[listing.image_ids[0]]
    assert logits.shape == (3, 3)
    assert not np.allclose(logits[0], logits[1])  # view 1 is an augmented image, view 0 the clean one
    import ray

    rows = ray.data.from_items([{"image_id": i} for i in listing.image_ids[:4]])
    first = logit_cache.attach_logits(rows, cache, views=1).take(1)[0]
    np.testing.assert_array_equal(first["teacher_logits"], cache.lookup()[first["image_id"]][:1])  # the clean view
    assert logit_cache.attach_logits(rows, cache).take(1)[0]["teacher_logits"].shape == (3, 3)

    with pytest.raises(KdrayError, match="data listing differs"):
        logit_cache.open_cache(uri, list_split(synthetic_dir, "train", limit=11), 32)
    with pytest.raises(KdrayError, match="preprocessing differs"):
        logit_cache.open_cache(uri, listing, 48)
    storage.resolve(f"{uri}/cache.json").fs.delete_file(f"{uri}/cache.json")  # as if the writer died half-way
    with pytest.raises(KdrayError, match="not a complete logit cache"):
        logit_cache.open_cache(uri, listing, 32)
