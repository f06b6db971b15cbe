"""Offline scoring, four ways in one run on the same files and the same exported model, plus the box's ceiling.

    python bench/score.py                                  # sets png (real CXR, ≥ 20k files), jpeg, dicom, png-s3
    python bench/score.py --sets png --png-files 5000      # a quicker look
    python bench/score.py --sets "" --memory 10000,100000   # memory at 10k and 100k inputs, via `ray job submit`

For each set:

- **raw model**: ``Predictor.probabilities`` on already decoded arrays, batch 32, default threads;
- **plain loop**: what a user writes in 20 lines: read, ``kdray.images.load_image``, the same ``Predictor``
  with its default threads, batches of 32, one process;
- **jobs.score, whole command**: ``python -m jobs.score`` as a subprocess, start to exit (starts its own Ray);
- **jobs.score, steady state**: from its summary, images between the 10th and 90th percentile of shard
  completion times, divided by that time span;
- **ceiling** = cores ÷ (decode core-seconds + single-thread inference core-seconds per image), both measured
  here, single-threaded, in the same run: before the other ways and again right after jobs.score, the
  ceiling using the mean (the shared box's speed drifts within a run; both are printed);
- **steal %**: the hypervisor's steal time during jobs.score (/proc/stat), which slows wall-clock rates but
  not the CPU-time ceiling.

``--memory N,M`` starts a local head (``cluster/local_head.sh``), hard-links N real CXR PNGs (or, with
``--memory-set small``, generates N 48-px PNGs), submits ``python -m jobs.score`` with ``ray job submit`` and
samples, every second, the job driver's RSS, the largest scoring worker's RSS and the object store's use (the
sampler is first checked against a 64 MiB object held in the store); the plain loop's rate, over the first
``--loop-files`` of the same files, gives the ratio.
The model's weights are random: speed does not depend on them. Results go to ``bench/results/score.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_flags, cpu_ticks, machine, steal_share  # noqa: E402
from kdray import storage  # noqa: E402
from kdray.evaluate import format_table  # noqa: E402
from kdray.images import load_image  # noqa: E402
from kdray.predictor import available_cpus, load_predictor  # noqa: E402

CXR = REPO.parent / "shared" / "datasets" / "cxr"
BATCH = 32


# ----------------------------------------------------------------------------- data sets


def make_png_set(root: Path, n: int) -> list[str]:
    """The real CXR PNGs, hard-linked over and over until there are ≥ n files."""
    sources = sorted(CXR.glob("*/*/*.png"))
    if not sources:
        raise SystemExit(f"no PNGs under {CXR}")
    files, copy = [], 0
    while len(files) < n:
        folder = root / f"copy{copy:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for src in sources:
            dst = folder / f"{src.parent.name}-{src.name}"
            if not dst.exists():
                os.link(src, dst)
            files.append(str(dst))
        copy += 1
    for stale in root.glob("copy*"):  # copies left by an earlier, larger run would be scored too
        if stale.is_dir() and int(stale.name[4:]) >= copy:
            shutil.rmtree(stale)
    return files


def make_jpeg_set(root: Path, n: int, side: int = 1024) -> list[str]:
    from PIL import Image

    from cluster.local.demo_data import CLASSES, make_image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bases = [make_image(CLASSES[i % 3], side, rng) for i in range(12)]
    files = []
    for i in range(n):
        path = root / f"{i:05d}.jpg"
        if not path.exists():
            noisy = np.clip(bases[i % len(bases)].astype(np.int16) + rng.integers(-6, 7, (side, side)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)
        files.append(str(path))
    return files


def make_dicom_set(root: Path, n: int, side: int = 1024) -> list[str]:
    """16-bit CR DICOMs (12 bits stored), every third one MONOCHROME1."""
    from cluster.local.demo_data import CLASSES, dicom_bytes, make_image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    bases = [make_image(CLASSES[i % 3], side, rng).astype(np.uint16) * 16 for i in range(6)]
    files = []
    for i in range(n):
        path = root / f"{i:05d}.dcm"
        if not path.exists():
            mono1 = i % 3 == 0
            pixels = bases[i % len(bases)]
            path.write_bytes(dicom_bytes((4095 - pixels) if mono1 else pixels,
                                         "MONOCHROME1" if mono1 else "MONOCHROME2"))
        files.append(str(path))
    return files


def make_small_png_set(root: Path, n: int, side: int = 48) -> list[str]:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    files = []
    for i in range(n):
        folder = root / f"{i // 10000:02d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{i:06d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(path, compress_level=1)
        files.append(str(path))
    return files


# ----------------------------------------------------------------------------- the four ways


def read(path: str) -> bytes:
    return storage.read_bytes(path)


def decode_core_seconds(files: list[str], size: int, n: int = 200) -> float:
    sample = files[:: max(1, len(files) // n)][:n]
    started = time.process_time()
    for f in sample:
        load_image(read(f), size)
    return (time.process_time() - started) / len(sample)


def infer_core_seconds(model: str, images: np.ndarray) -> float:
    predictor = load_predictor(model, threads=1)
    predictor.probabilities(images[:BATCH])
    started, done = time.process_time(), 0
    while done < 4 * len(images):
        for i in range(0, len(images), BATCH):
            done += len(predictor.probabilities(images[i:i + BATCH]))
    return (time.process_time() - started) / done


def raw_model(model: str, images: np.ndarray, seconds: float = 5.0) -> float:
    predictor = load_predictor(model)
    predictor.probabilities(images[:BATCH])
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        for i in range(0, len(images), BATCH):
            done += len(predictor.probabilities(images[i:i + BATCH]))
    return done / (time.perf_counter() - started)


def plain_loop(model: str, files: list[str]) -> float:
    """The hand-written baseline: one process, read + decode + predict in batches of 32."""
    predictor = load_predictor(model)
    started = time.perf_counter()
    batch = []
    for f in files:
        try:
            batch.append(load_image(read(f), predictor.image_size).pixels)
        except Exception:  # noqa: BLE001 - a loop would skip bad files
            continue
        if len(batch) == BATCH:
            predictor.probabilities(np.stack(batch))
            batch = []
    if batch:
        predictor.probabilities(np.stack(batch))
    return len(files) / (time.perf_counter() - started)


def jobs_score(model: str, input_uri: str, output: str, env: dict | None = None,
               submit_address: str | None = None) -> tuple[float, dict]:
    """Run jobs.score as a whole command (or through `ray job submit`); (wall seconds, its summary)."""
    args = ["-m", "jobs.score", "--model", model, "--input", input_uri, "--output", output, "--overwrite", "true"]
    if submit_address:
        cmd = [str(REPO / ".venv" / "bin" / "ray"), "job", "submit", "--address", submit_address,
               "--working-dir", str(REPO), "--", "python", *args]
    else:
        cmd = [sys.executable, *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"jobs.score failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, storage.read_json(storage.join(output, "summary.json"))


def bench_set(name: str, files: list[str], model: str, input_uri: str, workdir: Path, env: dict | None = None) -> dict:
    size = load_predictor(model).image_size
    print(f"[{name}] {len(files)} files", flush=True)
    decoded = np.stack([load_image(read(f), size).pixels for f in files[:256]])
    decode_cs = decode_core_seconds(files, size)
    infer_cs = infer_core_seconds(model, decoded)
    raw = raw_model(model, decoded)
    loop = plain_loop(model, files)
    output = str(workdir / f"out-{name}") if not input_uri.startswith("s3://") else f"{input_uri}-scored"
    if not output.startswith("s3://"):
        shutil.rmtree(output, ignore_errors=True)
    ticks = cpu_ticks()
    wall, summary = jobs_score(model, input_uri, output, env)
    steal = steal_share(ticks, cpu_ticks())
    # The shared box drifts: the per-image costs are measured again right after jobs.score, and the ceiling
    # uses the mean of both measurements (each is printed)
    decode_after, infer_after = decode_core_seconds(files, size), infer_core_seconds(model, decoded)
    ceiling = available_cpus() / ((decode_cs + decode_after + infer_cs + infer_after) / 2)
    whole = len(files) / wall
    steady = summary.get("steady_img_per_s") or float("nan")
    row = {"set": name, "files": len(files), "decode ms/img (1 core)": 1000 * decode_cs,
           "infer ms/img (1 thread)": 1000 * infer_cs, "decode ms/img after": 1000 * decode_after,
           "infer ms/img after": 1000 * infer_after, "ceiling img/s": ceiling, "raw model img/s": raw,
           "plain loop img/s": loop, "jobs.score whole img/s": whole, "jobs.score steady img/s": steady,
           "steady / ceiling": steady / ceiling, "steady / loop": steady / loop, "whole / loop": whole / loop,
           "steal % during jobs.score": 100 * steal, "errors": summary["errors"]}
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- memory, via ray job submit


#: A helper process that prints the object store's use (MiB) once a second: one RPC per sample, with Ray
#: imported once (a `ray memory` command per sample costs about a core-second each and slows the job down).
STORE_PROBE = """
import re, sys, time
import ray
from ray._private.internal_api import memory_summary
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while True:
    try:
        text = memory_summary(sys.argv[1], stats_only=True)
        match = re.search(r"Plasma memory usage ([\\d.]+) MiB", text)
        print(match.group(1) if match else "nan", flush=True)
    except Exception:
        print("nan", flush=True)
    time.sleep(1.0)
"""


class Sampler(threading.Thread):
    """Every second: the job driver's RSS, the largest scoring worker's RSS, the object store's use."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address, self.stop = address, threading.Event()
        self.driver = self.worker = 0.0
        self.store = float("nan")  # stays NaN if no sample could be read
        self.probe = subprocess.Popen([sys.executable, "-c", STORE_PROBE, address], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=probe_env())
        threading.Thread(target=self._read_store, daemon=True).start()

    def _read_store(self) -> None:
        for line in self.probe.stdout:
            sample = float(line.strip() or "nan")
            if not math.isnan(sample):
                self.store = sample if math.isnan(self.store) else max(self.store, sample)

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                rss = (proc.info["memory_info"].rss if proc.info["memory_info"] else 0) / 2**20
                if "jobs.score" in cmd and "ray job submit" not in cmd and "ray::" not in cmd:
                    self.driver = max(self.driver, rss)
                elif cmd.startswith(("ray::ShardScorer", "ray::MapWorker", "ray::_MapWorker")):
                    self.worker = max(self.worker, rss)
            self.stop.wait(1.0)
        self.probe.kill()
        self.probe.wait()


def probe_env() -> dict:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}  # as local_head.sh


def calibrate_store_sampler(address: str) -> float:
    """What the object-store column reads while a 64 MiB object is held in the store (a check of the sampler)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, numpy as np, ray; from kdray.raycluster import init_ray; init_ray(address=%r); "
        "ref = ray.put(np.ones(64 * 2**20, np.uint8)); print('held', flush=True); time.sleep(60)") % address],
        cwd=REPO, env=probe_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = Sampler(address)
    try:
        if holder.stdout.readline().strip() != "held":
            return float("nan")
        deadline = time.time() + 30  # the probe connects in a few seconds; then it should see the object
        while not sampler.store > 0 and time.time() < deadline:
            time.sleep(0.5)
        return sampler.store
    finally:
        sampler.stop.set()
        sampler.probe.kill()
        holder.kill()
        holder.wait()


def bench_memory(counts: list[int], model: str, workdir: Path, kind: str, loop_files: int) -> list[dict]:
    """Scoring through `ray job submit` at each input count, sampled every second.

    ``kind``: ``cxr`` (the real CXR PNGs, hard-linked) or ``small`` (generated 48-px PNGs). The plain loop's
    rate is taken over the first ``loop_files`` inputs (a rate, which does not depend on the count)."""
    env = {**os.environ, "KDRAY_RAY_PORT": "26380", "KDRAY_DASHBOARD_PORT": "28265", "RAY_AUTH_MODE": "token"}
    head = str(REPO / "cluster" / "local_head.sh")
    subprocess.run([head, "start"], env=env, check=True, cwd=REPO)
    address = "http://127.0.0.1:28265"
    rows = []
    try:
        calibration = calibrate_store_sampler("127.0.0.1:26380")
        print(f"object-store sampler reads {calibration:.1f} MiB while 64 MiB is held", flush=True)
        for n in counts:
            make = make_png_set if kind == "cxr" else make_small_png_set
            files = make(workdir / ("png" if kind == "cxr" else "small"), n)[:n]
            folder = workdir / f"{kind}-{n}"
            if not folder.exists():
                folder.mkdir()
                for i, f in enumerate(files):
                    os.link(f, folder / f"{i:07d}-{Path(f).name}")
            output = workdir / f"out-mem-{kind}-{n}"
            shutil.rmtree(output, ignore_errors=True)
            sampler = Sampler("127.0.0.1:26380")
            sampler.start()
            wall, summary = jobs_score(model, str(folder), str(output), env, submit_address=address)
            sampler.stop.set()
            sampler.join()
            loop = plain_loop(model, files[:loop_files])
            rows.append({"set": kind, "inputs": n, "peak driver RSS MiB": sampler.driver,
                         "peak worker RSS MiB": sampler.worker, "peak object store MiB": sampler.store,
                         "store sampler check (64 MiB held)": calibration, "ray job submit whole img/s": n / wall,
                         "steady img/s": summary.get("steady_img_per_s"),
                         f"plain loop img/s (first {min(n, loop_files)})": loop, "whole / loop": (n / wall) / loop})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        subprocess.run([head, "stop"], env=env, cwd=REPO)
    return rows


# ----------------------------------------------------------------------------- main


def export_random_student(workdir: Path, size: int) -> str:
    import torch

    from kdray.checkpoints import save_checkpoint
    from kdray.export import export_student
    from kdray.models import build_model
    from cluster.local.demo_data import CLASSES, make_image

    out = workdir / f"student-{size}"
    if (out / "metadata.json").exists() and "torch_weights" in json.loads((out / "metadata.json").read_text()):
        return str(out)  # (an export from before explanations has no torch weights: export it again)
    torch.manual_seed(0)
    model = build_model("student", len(CLASSES), 0.2)
    save_checkpoint(str(workdir / "ckpt"), model.state_dict(),
                    {"model_name": "student", "classes": list(CLASSES), "image_size": size, "dropout": 0.2})
    rng = np.random.default_rng(0)
    images = np.stack([make_image(CLASSES[i % 3], size, rng) for i in range(96)])
    export_student(str(workdir / "ckpt"), str(out), images[:64], images[64:], np.arange(32) % 3, strict=False)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="png,jpeg,dicom,png-s3")
    p.add_argument("--png-files", type=int, default=20322)
    p.add_argument("--jpegs", type=int, default=2000)
    p.add_argument("--dicoms", type=int, default=1000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--memory", default="", help="comma-separated input counts, e.g. 10000,100000")
    p.add_argument("--memory-set", choices=("cxr", "small"), default="cxr",
                   help="memory runs on the real CXR PNGs (hard-linked) or on generated 48-px PNGs")
    p.add_argument("--loop-files", type=int, default=10000, help="memory runs: inputs timed in the plain loop")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kdray-bench-score"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "score.md"))
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = export_random_student(workdir, a.size)
    backend = load_predictor(model).backend
    started = dt.datetime.now(dt.timezone.utc)
    rows, memory = [], []
    sets = [s for s in a.sets.split(",") if s]
    if "png" in sets or "png-s3" in sets:
        png = make_png_set(workdir / "png", a.png_files)
    if "png" in sets:
        rows.append(bench_set("png (real CXR)", png, model, str(workdir / "png"), workdir))
    if "jpeg" in sets:
        jpeg = make_jpeg_set(workdir / "jpeg", a.jpegs)
        rows.append(bench_set("jpeg 1024 px", jpeg, model, str(workdir / "jpeg"), workdir))
    if "dicom" in sets:
        dicom = make_dicom_set(workdir / "dicom", a.dicoms)
        rows.append(bench_set("dicom 1024 px, 12-bit", dicom, model, str(workdir / "dicom"), workdir))
    if "png-s3" in sets:
        from cluster.local.s3 import LocalS3

        with LocalS3(workdir / "s3") as s3:
            s3.create_bucket("bench")
            env = s3.env()
            os.environ.update(env)
            uri = "s3://bench/png"
            if not storage.exists(f"{uri}/copy000"):
                print("uploading the PNG set to the local S3 ...", flush=True)
                storage.copy_dir(str(workdir / "png"), uri)
            s3_files = [f"s3://{f.path}" for f in storage.list_files(storage.resolve(uri))]
            rows.append(bench_set("png (real CXR), local S3", s3_files, model, uri, workdir, env))
    if a.memory:
        memory = bench_memory([int(n) for n in a.memory.split(",")], model, workdir, a.memory_set, a.loop_files)
    report(a.output, rows, memory, model, backend, started)


def report(path: str, rows: list[dict], memory: list[dict], model: str, backend: str, started) -> None:
    lines = [f"# Offline scoring benchmark ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {machine()}", f"CPU flags: {cpu_flags()}", "",
             f"Model: a random-weights MobileNetV2 student exported by kdray, served as {backend} "
             f"({Path(model).name}); speed does not depend on the weights.", "",
             "Ways: raw model on decoded arrays; the plain single-process loop (read, `load_image`, the same "
             "`Predictor`, batch 32); `python -m jobs.score` whole command (its own local Ray start included); "
             "jobs.score steady state (10th–90th percentile of shard completions). Ceiling = cores ÷ (decode "
             "core-s + single-thread inference core-s) per image, measured here before and again right after "
             "jobs.score (the mean of the two; the box drifts). Steal: the share of CPU time the hypervisor gave "
             "other guests during jobs.score (it slows wall-clock rates, not the CPU-time ceiling).", ""]
    if rows:
        lines.append(format_table(rows, list(rows[0])))
    if memory:
        lines += ["", "## Memory and `ray job submit` (sampled every second; set: cxr = real CXR PNGs hard-linked, small = generated 48-px PNGs)", "",
                  format_table(memory, list(memory[0]))]
    text = "\n".join(lines) + "\n"
    print(text)
    if not rows:  # a memory-only run keeps the sets' table and writes its own file
        path = path.replace(".md", "-memory.md")
    Path(path).write_text(text)


if __name__ == "__main__":
    main()
