"""The training loop: Ray Train (v2) integration with 2 workers, data from S3, checkpoints to S3, resume by run
name; and its pieces (validation sharding, learning-rate schedule, precise BatchNorm) without Ray."""

import re

import pytest

from kdray import storage
from kdray.checkpoints import load_model, read_checkpoint_meta, read_run_summary
from kdray.config import TrainJobConfig, load_config
from kdray.data import load_training_data
from kdray.schemas import RunSummary
from kdray.train import _my_share, fit, make_optimizer


def _cfg(data: str, output: str, name: str, epochs: int) -> TrainJobConfig:
    return load_config(TrainJobConfig, [
        "--data", data, "--output", output, "--name", name, "--model.name", "tiny_teacher",
        "--image_size", "48", "--epochs", str(epochs), "--batch_size", "8", "--lr", "3e-3",
        "--warmup_epochs", "0.5", "--num_workers", "2", "--ema_decay", "0.9", "--seed", "0",
    ])


def _epoch_losses(text: str) -> dict[int, float]:
    """Train loss per epoch from the workers' ``[kdray] epoch E/N: loss L ...`` lines."""
    return {int(e): float(loss) for e, loss in re.findall(r"\[kdray\] epoch (\d+)/\d+: loss ([\d.]+)", text)}


def _worker_output(caplog, capfd) -> str:
    """The workers' lines so far: in the log (quiet, the default), or on the console with --verbose."""
    captured = capfd.readouterr()
    return caplog.text + captured.out + captured.err


@pytest.mark.integration
def test_two_worker_teacher_learns_checkpoints_to_s3_and_resumes(synthetic_s3, s3_bucket, ray_local, caplog, capfd):
    caplog.set_level("INFO")
    output = f"s3://{s3_bucket}/runs"
    cfg = _cfg(synthetic_s3, output, "tiny-teacher-test", epochs=8)
    summary = fit(cfg, load_training_data(cfg.data))
    assert isinstance(summary, RunSummary) and summary == read_run_summary(f"{output}/tiny-teacher-test")
    assert summary.workers == 2 and summary.model_name == "tiny_teacher"
    assert summary.best_checkpoint.startswith(f"s3://{s3_bucket}/runs/tiny-teacher-test/checkpoint_")
    assert summary.best_metrics["val_n"] == 60  # every val image, each scored by one of the 2 workers
    # it learns: on a fixed seed the training loss of the last epoch is below the first one's
    losses = _epoch_losses(_worker_output(caplog, capfd))
    assert summary.final_metrics["epoch"] == 8 and 1 in losses, caplog.text[-3000:]
    assert summary.final_metrics["train_loss"] < losses[1], (losses, summary.final_metrics)
    assert [s["path"].rsplit("/", 1)[-1] for s in summary.skipped_images] == ["zz-corrupt.png"]
    assert storage.exists(f"{output}/tiny-teacher-test/args.yaml")
    model, meta = load_model(f"{output}/tiny-teacher-test")  # a run folder resolves to its best checkpoint
    assert meta.classes == ["covid", "normal", "pneumonia"] and meta.image_size == 48
    assert meta.ema_decay == 0.9  # the validated and checkpointed weights are the EMA ones
    data_card = meta.training_data  # for the model card: 40 per class listed, the corrupt PNG skipped
    assert data_card["per_class"] == {"covid": 41, "normal": 40, "pneumonia": 40}
    assert data_card["images"] == 120 and data_card["skipped_images"] == 1

    # the same run name resumes from the latest checkpoint instead of starting over
    caplog.clear()
    cfg = _cfg(synthetic_s3, output, "tiny-teacher-test", epochs=9)
    resumed = fit(cfg, load_training_data(cfg.data))
    assert "resuming tiny-teacher-test from epoch 8" in _worker_output(caplog, capfd)
    assert resumed.final_metrics["epoch"] == 9
    assert read_checkpoint_meta(resumed.best_checkpoint).epoch >= summary.best_metrics["epoch"]
    # where each worker ran, one record per worker start: 2 from the first run, 2 resuming at epoch 8
    records = [storage.read_json(f"{output}/tiny-teacher-test/workers/{f.base_name}")
               for f in storage.list_files(storage.resolve(f"{output}/tiny-teacher-test/workers"))]
    assert sorted((r["start_epoch"], r["rank"]) for r in records) == [(0, 0), (0, 1), (8, 0), (8, 1)]
    assert all(r["node_id"] and r["pid"] for r in records)


def test_each_val_image_is_scored_by_exactly_one_worker():
    ids = [f"img-{i:04d}" for i in range(1000)]
    shares = [_my_share(ids, rank, 3) for rank in range(3)]
    assert (sum(s.astype(int) for s in shares) == 1).all()
    assert all(250 < s.sum() < 420 for s in shares)  # roughly even
    assert _my_share(ids[::-1], 1, 3)[::-1].tolist() == shares[1].tolist()  # order does not matter


def test_learning_rate_schedule_warms_up_then_decays():
    import torch

    cfg = load_config(TrainJobConfig, ["--lr", "0.1", "--epochs", "4", "--warmup_epochs", "1", "--optimizer", "sgd"])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer, schedule = make_optimizer(cfg, model, steps_per_epoch=10)
    lrs = []
    for step in range(41):
        schedule.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.01) and lrs[10] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[40] < 1e-3  # cosine down to ~0
    decay = sorted((len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups)
    assert decay == [(1, cfg.optim.weight_decay), (3, 0.0)]  # no decay on the conv bias and the BatchNorm


def _recalibrate_as_worker(rank: int, init_file: str, batches_per_rank: list, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from kdray.models import build_model
    from kdray.train import _recalibrate_batchnorm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both workers, as under DDP
    model = build_model("tiny_teacher", 3)
    _recalibrate_batchnorm(model, batches_per_rank[rank], torch.device("cpu"), use_amp=False)
    torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.integration  # two spawned processes that each import torch: too slow for the unit tier
def test_precise_bn_pools_statistics_over_workers_like_one_pass_over_all_batches(tmp_path):
    import numpy as np
    import torch
    import torch.multiprocessing as mp

    from kdray.models import build_model
    from kdray.train import _recalibrate_batchnorm

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 32, 32), dtype=np.uint8) for _ in range(3)]
    batches[2] = (batches[2] // 4).astype(np.uint8)  # a darker batch, so the workers' statistics differ
    per_rank = [batches[:1], batches[1:]]  # unequal counts: rank 1 weighs twice as much
    mp.spawn(_recalibrate_as_worker, args=(str(tmp_path / "init"), per_rank, str(tmp_path)), nprocs=2)

    torch.manual_seed(0)
    reference = build_model("tiny_teacher", 3)
    _recalibrate_batchnorm(reference, batches, torch.device("cpu"), use_amp=False)  # one process, every batch
    expected = reference.state_dict()
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    stat_keys = [k for k in expected if k.endswith(("running_mean", "running_var"))]
    assert stat_keys
    for key in stat_keys:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)  # every worker: same model
        torch.testing.assert_close(states[0][key], expected[key], rtol=1e-4, atol=1e-5)
