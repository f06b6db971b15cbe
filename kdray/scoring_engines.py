"""Where the shards of a scoring run are scored: Ray Data on a cluster, or this process on one machine.

Both engines run the same :class:`kdray.shard_scorer.ShardScorer` over the same plan, so their outputs, resume
and exactly-once guarantees are the same; they differ only in where the scorers live.

- **ray**: Ray Data streams the shard list through a pool of ShardScorer actors, one single-threaded scorer per
  CPU of the cluster (half a CPU each, so that Ray Data's own tasks are never starved: PITFALLS.md), or one per
  GPU. Used when there is a cluster to use: ``RAY_ADDRESS`` is set, Ray is already running in this process, or
  the job is a submitted Ray job.
- **local**: one ShardScorer per CPU this process may use, each in a thread (ONNX Runtime and the decoders run
  outside the GIL for most of their time), fed the shards in order. No Ray start-up, which dominated small jobs.

``auto`` (the default) picks ray where there is a cluster, else local.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from kdray import KdrayError
from kdray.shard_scorer import ShardResult, ShardScorer

log = logging.getLogger(__name__)
progress_log = logging.getLogger("kdray.progress")

ENGINES = ("auto", "local", "ray")
#: Set by Ray in the environment of a submitted job's driver.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def choose_engine(engine: str = "auto") -> str:
    """``local`` or ``ray``: ``auto`` is ray where there is a cluster to use, else local."""
    if engine not in ENGINES:
        raise KdrayError(f"unknown scoring engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    ray = sys.modules.get("ray")
    running = ray is not None and ray.is_initialized()
    return "ray" if running or os.environ.get("RAY_ADDRESS") or os.environ.get(RAY_JOB_ENV) else "local"


class Progress:
    """One progress line every ``every_s`` seconds (and after the last shard)."""

    def __init__(self, total: int | None, shards: int, every_s: float = 5.0):
        self.total, self.shards, self.every_s = total, shards, every_s
        self.started = self.last = time.time()
        self.images = self.done_shards = 0

    def update(self, inputs: int) -> None:
        self.images += inputs
        self.done_shards += 1
        now = time.time()
        if now - self.last < self.every_s and self.done_shards < self.shards:
            return
        self.last = now
        rate = self.images / max(now - self.started, 1e-9)
        if self.total:
            eta = (self.total - self.images) / rate if rate else float("nan")
            progress_log.info("scored %d/%d images (%.0f%%), %.1f img/s, ETA %.0f s", self.images, self.total,
                              100 * self.images / self.total, rate, eta)
        else:
            progress_log.info("scored %d images, shard %d/%d, %.1f img/s", self.images, self.done_shards,
                              self.shards, rate)


def scoring_pool(use_gpu: bool, shards: int | None = None):
    """(compute, per-actor resources, threads) on Ray: one single-threaded scorer per CPU, each asking for half a
    CPU so that Ray Data's own tasks are never starved; a GPU each where there are GPUs. The pool has its full
    size from the start (no ramp-up), but never more actors than shards, and its actors are spread over the nodes:
    packed onto one, a node's loss would take every scorer with it (and the others' cores would idle)."""
    from ray.data import ActorPoolStrategy

    from kdray.raycluster import cluster_cpus, cluster_gpus

    gpus = int(cluster_gpus())
    if use_gpu and gpus:
        size = max(1, min(gpus, shards or gpus))
        return ActorPoolStrategy(size=size), {"num_gpus": 1, "num_cpus": 1, "scheduling_strategy": "SPREAD"}, 1
    cpus = max(1, int(cluster_cpus()))
    size = max(1, min(cpus, shards or cpus))
    return ActorPoolStrategy(size=size), {"num_cpus": 0.5, "scheduling_strategy": "SPREAD"}, 1


def run_on_ray(work: list[dict], scorer: dict, on_gpu: bool, progress: Progress) -> list[ShardResult]:
    """Stream ``work`` (``{"shard", "entries"}`` rows) through a pool of ShardScorer actors built from ``scorer``
    (its constructor's arguments); stops at the first fatal result, which it returns last."""
    import ray

    from kdray.runner import root_cause

    compute, resources, threads = scoring_pool(on_gpu, len(work))
    ds = ray.data.from_items(work, override_num_blocks=len(work))
    scored = ds.map_batches(ShardScorer, batch_size=1, batch_format="numpy", compute=compute,
                            fn_constructor_kwargs={**scorer, "threads": threads}, **resources)
    results = []
    try:
        for row in scored.iter_rows():
            results.append(ShardResult.from_row(row))
            if results[-1].fatal:
                break  # stops the dataset; the actors are released
            progress.update(results[-1].inputs)
    except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's error; show its root cause in one line
        raise KdrayError(root_cause(exc)) from None
    return results


def local_workers() -> int:
    """Scorers of the local engine: the CPUs this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_locally(work: list[dict], scorer: dict, progress: Progress, workers: int | None = None) -> list[ShardResult]:
    """Score ``work`` in this process: ``workers`` ShardScorers (single-threaded models), each in its own thread,
    taking the shards in order; stops at the first fatal result, which it returns last."""
    workers = max(1, min(workers or local_workers(), len(work)))
    local = threading.local()

    def score(item: dict) -> ShardResult:
        if not hasattr(local, "scorer"):
            local.scorer = ShardScorer(**{**scorer, "threads": 1})
        return local.scorer.score(item["shard"], item["entries"])

    results: list[ShardResult] = []
    queue = iter(work)
    with ThreadPoolExecutor(workers, thread_name_prefix="kdray-scorer") as pool:
        running = {pool.submit(score, item) for item in _take(queue, workers)}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                results.append(future.result())
                if results[-1].fatal:
                    for other in running:
                        other.cancel()
                    wait(running)  # (a shard in progress finishes; its files are rewritten by a re-run)
                    return results
                progress.update(results[-1].inputs)
            running |= {pool.submit(score, item) for item in _take(queue, len(finished))}
    return results


def _take(queue, n: int) -> list:
    out = []
    for item in queue:
        out.append(item)
        if len(out) == n:
            break
    return out
