"""Offline scoring with Ray Data: exported runtime by default, unreadable images become error rows."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdray import KdrayError, storage
from kdray.data import sample_images
from kdray.score import score_archive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported_student(tmp_path_factory, synthetic_dir):
    from conftest import make_checkpoint
    from kdray.export import export_student

    root = tmp_path_factory.mktemp("student")
    ckpt = make_checkpoint(root / "ckpt", "tiny_student", image_size=32, covid_threshold=0.2)
    calib, _ = sample_images(synthetic_dir, "train", 32, 32)
    parity, labels = sample_images(synthetic_dir, "val", 32, 60)
    export_student(ckpt, str(root / "export"), calib, parity, labels)
    return str(root / "export")


def test_scores_an_s3_prefix_with_a_corrupt_file(synthetic_s3, s3_bucket, exported_student, ray_local):
    out = f"s3://{s3_bucket}/scored"
    summary = score_archive(exported_student, f"{synthetic_s3}/train/covid", out)
    assert summary["images"] == 41 and summary["scored"] == 40 and summary["errors"] == 1
    predictions = pq.read_table(storage.resolve(f"{out}/predictions").path, filesystem=storage.s3_filesystem())
    assert predictions.num_rows == 40
    assert {"path", "label", "p_covid", "p_normal", "p_pneumonia", "covid_suspect", "model_id"} <= set(
        predictions.column_names)
    assert set(predictions["backend"].to_pylist()) == {"onnx-int8"}  # the fastest validated artifact by default
    probs = np.stack([predictions[f"p_{c}"].to_numpy() for c in ("covid", "normal", "pneumonia")], 1)
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (predictions["covid_suspect"].to_numpy(zero_copy_only=False) == (probs[:, 0] >= 0.2)).all()
    errors = pq.read_table(storage.resolve(f"{out}/errors").path, filesystem=storage.s3_filesystem()).to_pylist()
    assert errors == [{"path": f"{s3_bucket}/synthetic/train/covid/zz-corrupt.png",
                       "reason": "cannot decode image: not a recognised image format"}]
    assert storage.read_json(f"{out}/summary.json")["scored"] == 40

    with pytest.raises(KdrayError, match="already holds a finished scoring run"):
        score_archive(exported_student, f"{synthetic_s3}/train/covid", out)


def test_empty_input_is_a_clear_error(tmp_path, exported_student):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no images here")
    with pytest.raises(KdrayError, match="no image files"):
        score_archive(exported_student, str(tmp_path / "in"), str(tmp_path / "out"))
