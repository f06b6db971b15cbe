"""Ray Train (v2) integration: 2 workers, data from S3, checkpoints to S3, resume by run name."""

import pytest

from kdray import storage
from kdray.checkpoints import load_model, read_meta
from kdray.config import TrainJobConfig, load_config
from kdray.train import _lr_lambda, fit

pytestmark = pytest.mark.integration


def _cfg(data: str, output: str, name: str, epochs: int) -> TrainJobConfig:
    return load_config(TrainJobConfig, [
        "--data", data, "--output", output, "--name", name, "--model.name", "tiny_teacher",
        "--image_size", "48", "--epochs", str(epochs), "--batch_size", "8", "--lr", "3e-3",
        "--warmup_epochs", "0.5", "--num_workers", "2", "--ema_decay", "0.9",
    ])


def test_two_worker_teacher_learns_checkpoints_to_s3_and_resumes(synthetic_s3, s3_bucket, ray_local, capfd):
    output = f"s3://{s3_bucket}/runs"
    summary = fit(_cfg(synthetic_s3, output, "tiny-teacher-test", epochs=8))
    assert summary["workers"] == 2
    assert summary["best_checkpoint"].startswith(f"s3://{s3_bucket}/runs/tiny-teacher-test/checkpoint_")
    assert summary["best_metrics"]["val_n"] >= 58  # the 60 val images, split evenly across 2 workers
    # chance is 1/3 on three balanced classes
    assert summary["best_metrics"]["val_accuracy"] >= 0.6, summary["best_metrics"]
    assert [s["path"].rsplit("/", 1)[-1] for s in summary["skipped_images"]] == ["zz-corrupt.png"]
    assert storage.exists(f"{output}/tiny-teacher-test/args.yaml")
    model, meta = load_model(f"{output}/tiny-teacher-test")  # a run folder resolves to its best checkpoint
    assert meta["classes"] == ["covid", "normal", "pneumonia"] and meta["image_size"] == 48
    assert meta["ema_decay"] == 0.9  # the validated and checkpointed weights are the EMA ones
    data_card = meta["training_data"]  # for the model card: 40 per class listed, the corrupt PNG skipped
    assert data_card["per_class"] == {"covid": 41, "normal": 40, "pneumonia": 40}
    assert data_card["images"] == 120 and data_card["skipped_images"] == 1

    # the same run name resumes from the latest checkpoint instead of starting over
    resumed = fit(_cfg(synthetic_s3, output, "tiny-teacher-test", epochs=9))
    assert "resuming tiny-teacher-test from epoch 8" in capfd.readouterr().out
    assert resumed["final_metrics"]["epoch"] == 9
    assert read_meta(resumed["best_checkpoint"])["epoch"] >= summary["best_metrics"]["epoch"]


def test_learning_rate_schedule_warms_up_then_decays():
    fn = _lr_lambda(steps_per_epoch=10, epochs=4, warmup_epochs=1)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0) and fn(39) < 0.01
    assert all(fn(i) >= fn(i + 1) for i in range(10, 39))
