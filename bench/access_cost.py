"""CPU each request pays for authentication, the access log (serve/access.py) and the Prometheus metrics
(serve/metrics.py), side by side in one run.

The whole-endpoint comparison (``bench/serve.py --compare access``) varies ±15% from run to run on a 2-core
box, more than the effect it looks for. This measures the layer itself: the same ASGI stack around a trivial
app, called in-process, with auth and the log off and then on (a tokens file, a bearer token per request, each
line written to a file), then metrics off and on (auth and log off), alternating rounds.
Run: ``python bench/access_cost.py [--requests 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from serve import access, metrics  # noqa: E402
from serve.options import ACCESS  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
BODY = b"\x89PNG" + b"\0" * 30_000  # the size of the benchmark's real CXR PNG


async def _inner(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"label": "normal"}'})


def _scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"image/png"), *headers]}


async def _requests(app, n: int, headers: list[tuple[bytes, bytes]]) -> None:
    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message):
        pass

    for _ in range(n):
        await app(_scope(headers), receive, send)


def cpu_us_per_request(app, n: int, headers) -> float:
    started = time.process_time()
    asyncio.run(_requests(app, n, headers))
    return 1e6 * (time.process_time() - started) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = os.path.join(tmp, "tokens")
        Path(tokens).write_text(f"{TOKEN}\n")
        handler = logging.FileHandler(os.path.join(tmp, "access.jsonl"))  # where a replica writes: a file
        access.log.addHandler(handler)
        access.log.setLevel(logging.INFO)
        access.log.propagate = False
        no_metrics = dataclasses.replace(metrics.METRICS, enabled=False)
        with_metrics = dataclasses.replace(metrics.METRICS, enabled=True)
        quiet = dataclasses.replace(ACCESS, log=False)
        off = access.Access(_inner, "front", quiet, no_metrics)
        on = access.Access(_inner, "front", dataclasses.replace(ACCESS, tokens_file=tokens, log=True), no_metrics)
        measured = access.Access(_inner, "front", quiet, with_metrics)
        metrics.serving("kdray-student:0.1.0@sha256:0123456789ab#int8", "bench-replica", "kdray-student", "0.1.0",
                        "onnx-int8")
        bare = []
        costs = {"off": [], "on": [], "metrics": []}
        for _ in range(args.rounds):
            bare.append(cpu_us_per_request(_inner, args.requests, []))
            costs["off"].append(cpu_us_per_request(off, args.requests, []))
            costs["on"].append(cpu_us_per_request(on, args.requests, [(b"authorization", f"Bearer {TOKEN}".encode())]))
            costs["metrics"].append(cpu_us_per_request(measured, args.requests, []))
        lines = sum(1 for _ in open(os.path.join(tmp, "access.jsonl")))
    print(machine())
    print(f"{args.rounds} rounds of {args.requests} requests, alternating; {lines} access-log lines written")
    median = {k: statistics.median(v) for k, v in costs.items()}
    print(f"CPU per request, median: the app alone {statistics.median(bare):.1f} us; with the access layer, "
          f"auth and log off {median['off']:.1f} us, on {median['on']:.1f} us")
    print(f"auth + access log cost {median['on'] - median['off']:.1f} us of CPU per request")
    print(f"metrics on: {median['metrics']:.1f} us; metrics cost {median['metrics'] - median['off']:.1f} us of CPU "
          "per request")


if __name__ == "__main__":
    main()
