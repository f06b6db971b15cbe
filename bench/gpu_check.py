"""GPU check: kdray's training step and inference on a CUDA device (bf16 autocast, channels_last).

    python bench/gpu_check.py                       # on a machine with a GPU; prints a Markdown report
    python bench/gpu_check.py --allow-cpu --size 64 --steps 3   # a dry run of the script on a CPU

It needs no Ray and no data set, so it runs on a bare GPU machine with torch, torchvision, pyarrow,
Pillow and scikit-learn. For the teacher (ResNet50V2 + VGG19-BN) and the MobileNetV2 student, at
the paper's 224 px by default, it runs the library's own pieces, not copies:
``kdray.train.train_step`` (the step of the Ray Train loop), ``make_optimizer``, ``_make_ema`` and
``_recalibrate_batchnorm``, and ``kdray.torch_predictor.TorchPredictor``. It checks and reports:

- the layout and precision the code promises on a GPU: weights and inputs in channels_last, the
  forward pass in bf16 under autocast, the loss in float32;
- that the step learns: the loss on one fixed batch of random images falls when trained on it
  (the KD step too, with teacher logits);
- training throughput (images/s, after warm-up, synchronised) and peak GPU memory;
- precise BN on the GPU, and that GPU inference (bf16) of the trained student agrees with fp32 CPU
  inference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdray.config import TrainJobConfig, from_dict  # noqa: E402
from kdray.models import build_model  # noqa: E402
from kdray.train import (  # noqa: E402
    _channels_last_input,
    _make_ema,
    make_optimizer,
    _recalibrate_batchnorm,
    train_step,
)

CLASSES = 3


def _config(alpha: float, lr: float) -> TrainJobConfig:
    return from_dict(TrainJobConfig, {"kd": {"alpha": alpha, "temperature": 4.0},
                                      "optim": {"lr": lr, "label_smoothing": 0.0}})


def _batch(n: int, size: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    return _channels_last_input(images, device), torch.as_tensor(rng.integers(0, CLASSES, n), device=device), images


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_model(name: str, size: int, batch: int, steps: int, device,
                alpha: float) -> tuple[dict, torch.nn.Module, np.ndarray]:
    """Train one model on one fixed batch for ``steps`` steps; report what the GPU path did, and return the
    EMA model after precise BN with the images it was trained on."""
    torch.manual_seed(0)
    use_amp = device.type == "cuda"
    model = build_model(name, CLASSES).to(device).to(memory_format=torch.channels_last).train()
    cfg = _config(alpha, lr=1e-3)
    (optimizer, _), ema = make_optimizer(cfg, model, steps), _make_ema(model, 0.99)
    x, y, images = _batch(batch, size, device, seed=1)
    teacher = None  # KD row: teacher logits that agree with the labels, plus noise
    if alpha:
        teacher = 4 * torch.nn.functional.one_hot(y, CLASSES).float() + torch.randn(batch, CLASSES, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        forward_dtype = model(x).dtype
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, timed = [], []
    for step in range(steps):
        _sync(device)
        started = time.perf_counter()
        losses.append(train_step(model, optimizer, x, y, teacher, cfg, None, use_amp))  # .item() synchronises
        ema.update_parameters(model)
        timed.append(time.perf_counter() - started)
    warm = timed[min(3, len(timed) - 1):]
    _recalibrate_batchnorm(ema.module, [images], device, use_amp)
    return {
        "model": name, "px": size, "batch": batch, "KD alpha": alpha, "device": device.type,
        "forward dtype (autocast)": str(forward_dtype).replace("torch.", ""),
        "weights channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last),
        "input channels_last": x.is_contiguous(memory_format=torch.channels_last),
        "loss first -> last": f"{losses[0]:.3f} -> {losses[-1]:.3f}", "learns": losses[-1] < 0.5 * losses[0],
        "train img/s": round(batch * len(warm) / sum(warm), 1),
        "peak GPU MiB": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
        "precise BN finite": all(torch.isfinite(m.running_var).all().item() for m in ema.module.modules()
                                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)),
    }, ema.module, images


def check_inference(model: torch.nn.Module, trained_on: np.ndarray, device) -> dict:
    """A trained student (the first check's EMA copy) through TorchPredictor on the device (bf16) and on the
    CPU (fp32), on the images it was trained on and on fresh random ones (256 in all)."""
    import copy

    from kdray.torch_predictor import TorchPredictor

    size = trained_on.shape[-1]
    meta = {"classes": ["covid", "normal", "pneumonia"], "image_size": size}
    fresh = np.random.default_rng(2).integers(0, 256, (256 - len(trained_on), size, size), dtype=np.uint8)
    images = np.concatenate([trained_on, fresh])
    on_device = TorchPredictor(copy.deepcopy(model).float(), meta, device=device.type)
    cpu = TorchPredictor(copy.deepcopy(model).float().cpu(), meta, device="cpu")
    a, b = on_device.logits(images), cpu.logits(images)
    p_a, p_b = torch.softmax(torch.as_tensor(a), 1), torch.softmax(torch.as_tensor(b), 1)
    _sync(device)
    started = time.perf_counter()
    on_device.logits(images)
    _sync(device)
    return {"inference": f"TorchPredictor {device.type} vs CPU fp32, trained student {size} px, 256 images",
            "logit spread (CPU std)": round(float(b.std()), 3),
            "argmax agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max abs diff of probabilities": round(float((p_a - p_b).abs().max()), 4),
            "device img/s (batch 256)": round(256 / (time.perf_counter() - started), 1)}


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (a dry run)")
    p.add_argument("--output", default="", help="also write the report here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("error: no CUDA device (pass --allow-cpu for a dry run on the CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    what = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    student_row, student, trained_on = check_model("student", args.size, 64, args.steps, device, alpha=0.0)
    rows = [student_row, check_model("student", args.size, 64, args.steps, device, alpha=0.5)[0],
            check_model("teacher", args.size, 32, args.steps, device, alpha=0.0)[0]]
    inference = check_inference(student, trained_on, device)
    ok = all(r["learns"] and r["precise BN finite"] and r["weights channels_last"] for r in rows) and (
        device.type == "cpu" or all(r["forward dtype (autocast)"] == "bfloat16" for r in rows)) and (
        inference["argmax agreement"] >= 0.98)
    report = "\n".join([
        "# GPU check", "", f"- device: {what}; torch {torch.__version__}; {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"- command: `python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- {args.steps} steps on one fixed batch of random images per row; img/s after 3 warm-up steps", "",
        _table(rows), "", _table([inference]), "", f"all checks passed: {ok}", ""])
    print(report)
    if args.output:
        Path(args.output).write_text(report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
