"""JPEG decode speed of kdray.images with and without ``draft`` (libjpeg's reduced-size DCT decoding).

    python bench/images.py [--n 200] [--side 1024] [--size 224] [--rounds 5] [--quality 90] [--rgb]

Generates ``--n`` chest-X-ray-like JPEGs of ``--side`` px (cluster.local.demo_data) in memory and
decodes them to ``--size`` px through the one loader, with draft (what ``load_image`` does) and
without it (full-scale decode, the pre-draft behaviour). The two variants are interleaved round by
round, alternating which goes first, so that load from other processes on a shared machine falls on
both. Reported: img/s per variant (best round and median), the ratio, the mean absolute pixel
difference between the two outputs, and the CPU's vector flags. Prints only; writes no files.

Draft shrinks the inverse DCT, colour conversion and the resize, not the entropy (Huffman) decoding,
so the gain shrinks as the files grow: the synthetic images carry film-grain noise and are larger
than typical chest X-ray JPEGs of the same size at the same quality.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_flags, cpu_model  # noqa: E402
from cluster.local.demo_data import CLASSES, make_image  # noqa: E402
from kdray.images import DEFAULT_LIMITS, _load_image  # noqa: E402


def make_jpegs(n: int, side: int, rgb: bool, quality: int = 90, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(make_image(CLASSES[i % len(CLASSES)], side, rng))
        buf = io.BytesIO()
        (img.convert("RGB") if rgb else img).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def decode_all(jpegs: list[bytes], size: int, draft: bool) -> float:
    start = time.perf_counter()
    for data in jpegs:
        _load_image(data, size, DEFAULT_LIMITS, draft=draft)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated files")
    p.add_argument("--rgb", action="store_true", help="colour JPEGs (default: grayscale, as most chest X-rays)")
    a = p.parse_args(argv)

    jpegs = make_jpegs(a.n, a.side, a.rgb, a.quality)
    decode_all(jpegs[:10], a.size, True), decode_all(jpegs[:10], a.size, False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.rounds):
        for draft in ((True, False) if r % 2 == 0 else (False, True)):
            times[draft].append(decode_all(jpegs, a.size, draft))
    diff = np.mean([np.abs(_load_image(d, a.size, DEFAULT_LIMITS, draft=True).pixels.astype(int)
                           - _load_image(d, a.size, DEFAULT_LIMITS, draft=False).pixels).mean() for d in jpegs[:20]])
    rate = {k: (a.n / min(v), a.n / statistics.median(v)) for k, v in times.items()}
    kind = "RGB" if a.rgb else "grayscale"
    print(f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; flags: {cpu_flags()}")
    print(f"{a.n} {kind} {a.side}x{a.side} JPEGs (q{a.quality}, {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB avg) "
          f"-> {a.size}x{a.size}, {a.rounds} interleaved rounds, 1 thread")
    for draft, label in ((False, "full decode"), (True, "draft")):
        print(f"  {label:12s} {rate[draft][0]:7.1f} img/s best, {rate[draft][1]:7.1f} img/s median")
    ratio = (rate[True][0] / rate[False][0], rate[True][1] / rate[False][1])
    print(f"  draft speed-up: x{ratio[0]:.2f} (best), x{ratio[1]:.2f} (median); "
          f"mean |draft - full| = {diff:.2f} gray levels (of 255)")
    return {"img_per_s": rate, "ratio": ratio, "mean_abs_diff": float(diff), "flags": cpu_flags()}


if __name__ == "__main__":
    main()
