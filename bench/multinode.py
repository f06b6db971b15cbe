"""Throughput per CPU on a multi-node Ray cluster on this machine, and the numbers behind docs/scaling.md.

    python bench/multinode.py [--nodes 2] [--images 4000,16000] [--train-limit 600] [--listing 100000]

1. ``cluster/local_cluster.sh start --nodes N --cpus-per-node 1``: N raylets, one CPU each, on loopback.
2. Scoring: ``ray job submit -- python -m jobs.score`` over ``--images`` real CXR PNGs (hard-linked from
   ../shared/datasets/cxr; one job per count) with a random-weights student export (speed does not depend on
   the weights). Its summary gives img/s (whole command and steady state) and the nodes that scored; a sampler
   reads the CPU seconds of the job's driver process, the one central piece of a scoring job. Two counts give
   the driver's marginal CPU cost per shard (its start-up cancels out).
3. Training: ``ray job submit -- python -m jobs.train_student`` on the real CXR folder (``--data.limit`` images
   per split), one worker per node, one epoch at 128 px, no KD; img/s from the run's result.json.
4. Listing: a private SeaweedFS; ``--listing`` empty objects uploaded by a thread pool, then the time of
   ``kdray.storage.list_files`` and of ``kdray.score.plan_inputs`` (what a scoring job's driver does first).

The nodes share one 2-core box, so a per-CPU rate is what this measures. Writes bench/results/multinode.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_flags, machine  # noqa: E402
from bench.score import export_random_student, make_png_set  # noqa: E402
from kdray import storage  # noqa: E402
from kdray.raycluster import free_loopback_port  # noqa: E402

CXR = REPO.parent / "shared" / "datasets" / "cxr"
RAY = str(REPO / ".venv" / "bin" / "ray")


class DriverCpu(threading.Thread):
    """The CPU seconds of the process whose command line holds ``marker`` (a job's driver), last seen."""

    def __init__(self, marker: str):
        super().__init__(daemon=True)
        self.marker, self.seconds, self.stop = marker, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for proc in psutil.process_iter(["cmdline", "cpu_times"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if self.marker in cmd and "job submit" not in cmd and proc.info["cpu_times"]:
                    times = proc.info["cpu_times"]
                    self.seconds = max(self.seconds, times.user + times.system)
            self.stop.wait(0.5)


def submit(address: str, args: list[str], marker: str) -> tuple[float, float]:
    """``ray job submit`` of ``python <args>``; (wall seconds, the driver's CPU seconds)."""
    sampler = DriverCpu(marker)
    sampler.start()
    started = time.perf_counter()
    proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *args],
                          cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    sampler.stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"job failed: {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    return wall, sampler.seconds


def bench_scoring(address: str, images: int, workdir: Path, shard_size: int = 0) -> dict:
    files = make_png_set(workdir / "png", images)[:images]
    inputs = workdir / "inputs.csv"
    inputs.write_text("path\n" + "\n".join(files) + "\n")  # a manifest: exactly `images` inputs
    model = export_random_student(workdir, 224)
    out = workdir / "score-out"
    wall, driver_s = submit(address, ["-m", "jobs.score", "--model", model, "--input", str(inputs), "--output",
                                      str(out), "--overwrite", "true", "--shard_size", str(shard_size)], "jobs.score")
    summary = json.loads((out / "summary.json").read_text())
    return {"images": summary["images"], "shards": summary["shards"], "nodes": summary["nodes"], "wall_s": wall,
            "job_img_per_s": summary["img_per_s"], "steady_img_per_s": summary["steady_img_per_s"],
            "driver_cpu_s": driver_s, "backend": summary["backend"]}


def bench_training(address: str, nodes: int, limit: int, workdir: Path) -> dict:
    out = workdir / "train-out"
    name = f"multinode-{time.time_ns()}"
    wall, driver_s = submit(address, [
        "-m", "jobs.train_student", "--data", str(CXR), "--output", str(out), "--name", name,
        "--data.limit", str(limit), "--image_size", "128", "--epochs", "1", "--batch_size", "16",
        "--kd.alpha", "0", "--num_workers", str(nodes)], "jobs.train_student")
    result = json.loads((out / name / "result.json").read_text())
    records = [json.loads(p.read_text()) for p in (out / name / "workers").glob("*.json")]
    metrics = result["final_metrics"]
    return {"workers": len(records), "nodes": len({r["node_id"] for r in records}), "wall_s": wall,
            "train_img_per_s": metrics["train_img_per_s"], "train_s": metrics["train_s"],
            "epoch_s": metrics["epoch_s"], "driver_cpu_s": driver_s}


def bench_listing(keys: int, workdir: Path) -> dict:
    import boto3

    from cluster.local.s3 import LocalS3
    from kdray.score import plan_inputs

    with LocalS3(str(workdir / "s3")) as s3:
        s3.create_bucket("listing")
        os.environ.update(s3.env())
        client = boto3.client("s3", endpoint_url=s3.endpoint_url)
        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.put_object(Bucket="listing", Key=f"a/{i // 1000:03d}/{i:06d}.png", Body=b""),
                          range(keys)))
        upload_s = time.perf_counter() - started
        started = time.perf_counter()
        listed = storage.list_files(storage.resolve("s3://listing/a"))
        list_s = time.perf_counter() - started
        started = time.perf_counter()
        plan = plan_inputs("s3://listing/a", "model", 0)
        plan_s = time.perf_counter() - started
    return {"keys": keys, "listed": len(listed), "upload_s": upload_s, "list_s": list_s,
            "keys_per_s": len(listed) / list_s, "plan_s": plan_s, "plan_shards": len(plan.shards)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--images", default="4000,16000", help="comma-separated input counts, one scoring job each")
    p.add_argument("--shard-size", type=int, default=0, help="scoring shard size (0: jobs.score's automatic size)")
    p.add_argument("--train-limit", type=int, default=600, help="images per split for the training run (0: none)")
    p.add_argument("--listing", type=int, default=100000)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kdray-bench-multinode"))
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "multinode.md"))
    a = p.parse_args()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    env = {**os.environ, "KDRAY_CLUSTER_DIR": str(workdir / "cluster"), "KDRAY_RAY_PORT": str(free_loopback_port()),
           "KDRAY_DASHBOARD_PORT": str(free_loopback_port()), "RAY_AUTH_MODE": "token"}
    script = str(REPO / "cluster" / "local_cluster.sh")
    subprocess.run(["bash", script, "start", "--nodes", str(a.nodes), "--cpus-per-node", "1"], env=env, check=True,
                   capture_output=True)
    address = f"http://127.0.0.1:{env['KDRAY_DASHBOARD_PORT']}"
    try:
        scoring = [bench_scoring(address, int(n), workdir, a.shard_size) for n in a.images.split(",") if n]
        print("scoring", scoring, flush=True)
        training = bench_training(address, a.nodes, a.train_limit, workdir) if a.train_limit else None
        print("training", training, flush=True)
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True)
    listing = bench_listing(a.listing, workdir) if a.listing else None
    print("listing", listing, flush=True)
    report(a, scoring, training, listing, started)


def report(a, scoring: list[dict], training: dict | None, listing: dict | None, started) -> None:
    cpus = a.nodes  # one CPU per node
    lines = [f"# Multi-node throughput per CPU ({started:%Y-%m-%d %H:%M} UTC)", "",
             f"Machine: {machine()}", f"CPU flags: {cpu_flags()}", "",
             f"Cluster: `cluster/local_cluster.sh start --nodes {a.nodes} --cpus-per-node 1` ({a.nodes} raylets "
             f"on loopback, one CPU each; every node shares this box's 2 cores).", ""]
    if scoring:
        lines += ["## Scoring (`ray job submit -- python -m jobs.score`, real CXR PNGs, random-weights student at "
                  "224 px)", "", "| images | shards | nodes that scored | backend | whole job img/s | steady img/s | "
                  "steady img/s per CPU | job wall s | driver CPU s |", "|---|---|---|---|---|---|---|---|---|"]
        for row in scoring:
            steady = row["steady_img_per_s"] or float("nan")
            lines.append(f"| {row['images']} | {row['shards']} | {row['nodes']} | {row['backend']} | "
                         f"{row['job_img_per_s']:.1f} | {steady:.1f} | {steady / cpus:.1f} | {row['wall_s']:.0f} | "
                         f"{row['driver_cpu_s']:.1f} |")
        if len(scoring) > 1:
            first, last = scoring[0], scoring[-1]
            per_shard = (last["driver_cpu_s"] - first["driver_cpu_s"]) / max(last["shards"] - first["shards"], 1)
            lines += ["", f"Driver CPU per extra shard (between the first and last job): {1000 * per_shard:.0f} ms."]
        lines.append("")
    if training:
        lines += ["## Training (`ray job submit -- python -m jobs.train_student`, real CXR, MobileNetV2 at 128 px, "
                  "1 epoch)", "", "| workers | nodes | train img/s | train img/s per CPU | epoch s (incl. validation) | "
                  "job wall s |", "|---|---|---|---|---|---|",
                  f"| {training['workers']} | {training['nodes']} | {training['train_img_per_s']:.1f} | "
                  f"{training['train_img_per_s'] / cpus:.1f} | {training['epoch_s']:.1f} | {training['wall_s']:.0f} |",
                  ""]
    if listing:
        lines += ["## Listing (local SeaweedFS, empty objects, 1,000 per folder)", "",
                  "| keys | upload s (16 threads) | `storage.list_files` s | keys/s | `plan_inputs` s | shards planned |",
                  "|---|---|---|---|---|---|",
                  f"| {listing['listed']} | {listing['upload_s']:.0f} | {listing['list_s']:.1f} | "
                  f"{listing['keys_per_s']:.0f} | {listing['plan_s']:.1f} | {listing['plan_shards']} |", ""]
    lines += [f"`python bench/multinode.py --nodes {a.nodes} --images {a.images} --shard-size {a.shard_size} "
              f"--train-limit {a.train_limit} --listing {a.listing}`. What it means at 10 and 100 nodes: docs/scaling.md.", ""]
    Path(a.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
