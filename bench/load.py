"""A small closed-loop HTTP/1.1 load generator on asyncio (uvloop where installed), for bench/serve.py.

Each of ``concurrency`` workers keeps one keep-alive connection and sends the same POST again and again
for ``duration`` seconds (optionally paced to a total ``rate``). Every request is recorded with its status,
its latency and its ``Retry-After``; connection errors and timeouts are recorded too (hey's CSV output drops
them, which is why this exists). Its own CPU time is reported, so that the client's share of the box is
visible next to the server's numbers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LevelResult:
    concurrency: int
    duration: float
    rate: float | None
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    retry_after: int = 0  # 503 responses that carried Retry-After
    errors: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0

    def summary(self) -> dict:
        status = np.array(self.statuses, dtype=int)
        lat = np.array(self.latencies) * 1000
        ok, shed = lat[status == 200], lat[status == 503]
        other_5xx = int(((status >= 500) & (status != 503)).sum())
        counts = {str(code): int((status == code).sum()) for code in sorted(set(self.statuses))}
        return {"clients": self.concurrency, "offered req/s": self.rate or "closed loop",
                "ok req/s": len(ok) / self.duration,
                "p50 ms": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
                "p99 ms": float(np.percentile(ok, 99)) if len(ok) else float("nan"),
                "503s": int((status == 503).sum()),
                "503 p99 ms": float(np.percentile(shed, 99)) if len(shed) else float("nan"),
                "503 with Retry-After": self.retry_after, "other 5xx": other_5xx,
                "errors": sum(self.errors.values()), "statuses": counts,
                "client CPU %": 100 * self.client_cpu_s / self.duration}


def _request(host: str, port: int, path: str, body: bytes, content_type: str, headers: dict | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers


async def _worker(result: LevelResult, host: str, port: int, payload: bytes, deadline: float,
                  interval: float | None, timeout: float, start_delay: float) -> None:
    reader = writer = None
    next_send = time.perf_counter() + start_delay
    while True:
        if interval is not None:
            now = time.perf_counter()
            if next_send > now:
                await asyncio.sleep(next_send - now)
            next_send += interval
        if time.perf_counter() >= deadline:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            started = time.perf_counter()
            writer.write(payload)
            status, headers = await asyncio.wait_for(_read_response(reader), timeout)
            result.latencies.append(time.perf_counter() - started)
            result.statuses.append(status)
            if status == 503 and "retry-after" in headers:
                result.retry_after += 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            kind = type(exc).__name__
            result.errors[kind] = result.errors.get(kind, 0) + 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def _run(host: str, port: int, path: str, body: bytes, content_type: str, concurrency: int,
               duration: float, rate: float | None, timeout: float, headers: dict | None) -> LevelResult:
    result = LevelResult(concurrency, duration, rate)
    payload = _request(host, port, path, body, content_type, headers)
    interval = concurrency / rate if rate else None
    cpu0, deadline = time.process_time(), time.perf_counter() + duration
    await asyncio.gather(*(_worker(result, host, port, payload, deadline, interval, timeout,
                                   (i * interval / concurrency) if interval else 0.0) for i in range(concurrency)))
    result.client_cpu_s = time.process_time() - cpu0
    return result


def run_level(url: str, body: bytes, content_type: str, concurrency: int, duration: float,
              rate: float | None = None, timeout: float = 30.0, headers: dict | None = None) -> LevelResult:
    """Load ``url`` (``http://host:port/path``) with ``concurrency`` clients for ``duration`` seconds (each
    request with ``headers`` too, e.g. an Authorization)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return runner(_run(parts.hostname, parts.port, path, body, content_type, concurrency,
                       duration, rate, timeout, headers))
