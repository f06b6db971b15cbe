"""kdray/scoring_engines.py: the local engine (threads of this process) and Ray Data give the same results."""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from kdray import KdrayError, scoring_engines
from kdray.images import ImageLimits
from kdray.score import score_archive
from kdray.shard_scorer import ShardResult

LIMITS = ImageLimits(min_side=32, max_pixels=100 * 100)


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _folder(root):
    """40 PNGs and four refusals, in 2 sub-folders."""
    for i in range(40):
        (root / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 2}" / f"{i:03d}.png").write_bytes(_png(48, i))
    (root / "d0" / "tiny.png").write_bytes(_png(8, 99))
    (root / "d0" / "huge.png").write_bytes(_png(120, 98))
    (root / "d1" / "notes.txt").write_text("not an image")
    (root / "d1" / "cut.png").write_bytes(_png(48, 97)[:100])
    return root


def _outputs(out) -> tuple[list, list]:
    predictions = pads.dataset(out / "predictions", format="parquet").to_table().sort_by("path")
    errors = pads.dataset(out / "errors", format="parquet").to_table().sort_by("path")
    columns = [c for c in predictions.column_names if c not in ("backend",)]
    return predictions.select(columns).to_pylist(), errors.to_pylist()


@pytest.mark.unit
def test_auto_is_ray_only_where_there_is_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(scoring_engines.RAY_JOB_ENV, raising=False)
    ray = sys.modules.get("ray")
    if ray is not None:
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert scoring_engines.choose_engine("auto") == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert scoring_engines.choose_engine("auto") == "ray"
    assert scoring_engines.choose_engine("local") == "local"
    with pytest.raises(KdrayError, match="unknown scoring engine"):
        scoring_engines.choose_engine("spark")


@pytest.mark.unit
def test_the_local_engine_scores_without_ray(tmp_path, tiny_export):
    """No Ray at all (in the unit tier ray.init would raise): every input once, refusals with their reasons."""
    summary = score_archive(tiny_export[0], str(_folder(tmp_path / "in")), str(tmp_path / "out"), limits=LIMITS,
                            shard_size=8, engine="local")
    assert summary.engine == "local" and summary.images == 44 and summary.scored == 40 and summary.shards == 6
    assert summary.errors_by_reason == {"not_an_image": 1, "too_large": 1, "too_small": 1, "truncated": 1}
    predictions, errors = _outputs(tmp_path / "out")
    assert len({p["path"] for p in predictions} | {e["path"] for e in errors}) == 44


@pytest.mark.unit
def test_the_local_engine_stops_at_the_first_fatal_result(monkeypatch):
    scored = []

    class Scorer:
        def __init__(self, **_):
            pass

        def score(self, shard, entries):
            scored.append(shard)
            return ShardResult(shard, 1, 1, 0, fatal="S3 went away" if shard == 2 else "", done=shard != 2)

    monkeypatch.setattr(scoring_engines, "ShardScorer", Scorer)
    work = [{"shard": i, "entries": [f"{i}"]} for i in range(40)]
    results = scoring_engines.run_locally(work, {}, scoring_engines.Progress(40, 40), workers=2)
    assert results[-1].fatal == "S3 went away" and len(scored) < 10


@pytest.mark.integration
def test_both_engines_write_the_same_results(tmp_path, tiny_export, ray_local):
    folder = _folder(tmp_path / "in")
    for engine in ("local", "ray"):
        summary = score_archive(tiny_export[0], str(folder), str(tmp_path / engine), limits=LIMITS, shard_size=8,
                                engine=engine)
        assert summary.engine == engine
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "ray")
