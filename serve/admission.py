"""ASGI middleware: admit at most ``limit`` inference requests at once; answer the excess 503 + Retry-After.

A rejected request is held ``hold_s`` (an asyncio sleep: no CPU) before its 503 is sent. A client that
ignores Retry-After and retries at once (hey, a naive retry loop) then sends at most ``1 / hold_s`` requests
a second instead of thousands, and rejecting it stays cheap; answered in ``hold_s`` plus a few
milliseconds, the 503 is still fast. Health and metadata routes are never held back.

Where it sits: with direct ingress a replica answers HTTP itself, through Serve's ASGI entry point
(request metadata, Serve's own queue limits, then a hop to the thread that runs the FastAPI app). A refusal
made inside the FastAPI app pays all of that, and a storm of immediate retries then eats the replica's cores. So each replica also puts :class:`Admission` in front of Serve's entry point, at the
uvicorn server of its direct ingress, through Serve's HTTP callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
naming :func:`replica_middlewares`, set in the replica's own environment by ``serve/options.py``; never
node-wide, where Serve's proxy would call it too). A refusal there skips Serve's entry point and costs a
fraction as much (docs/architecture.md, "Measured choices").
The copy inside the FastAPI app stays as the fallback when requests arrive another way (Serve's proxy, or
direct ingress turned off); behind the front one it never refuses, since both count the same requests.
Refusals say which copy made them in ``x-kdray-refused-by`` (``front`` or ``app``).

Both copies sit in the same stack, :func:`guard_middlewares` (outermost first): the body limit
(serve/body_limit.py), the body deadline (serve/deadline.py: the whole body is received before a slot is
taken, so slow uploads hold none), this gate, then the request timeout (the slot is held at most that long).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

from serve.options import ADMISSION, CALLBACK, CALLBACK_ENV, DEPLOYMENT  # noqa: F401 - CALLBACK*: re-exported
from serve.options import MAX_BODY_BYTES, REQUEST
from serve.refusal import retry_after, send_refusal

OVERLOADED = 503
#: Environment variable that overrides ``ADMISSION.limit`` (set per deployment: ``deploy(admission_limit=N)``).
LIMIT_ENV = "KDRAY_ADMISSION_LIMIT"


class Admission:
    def __init__(self, app, limit: int, hold_s: float, retry_after_s: float, prefixes: tuple[str, ...],
                 layer: str = "app"):
        self.app, self.hold_s, self.prefixes = app, float(hold_s), tuple(prefixes)
        self.limit = admission_limit(limit)
        retry = retry_after(retry_after_s)
        self.retry_after = retry[1].decode()
        self.headers = (retry, (b"x-kdray-refused-by", layer.encode()))
        self.in_flight = 0
        self.rejected = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not _under(scope, self.prefixes):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            self.rejected += 1
            await asyncio.sleep(self.hold_s)
            return await self._refuse(send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(self, send) -> None:
        message = f"overloaded: {self.limit} requests are in progress; retry after {self.retry_after} s"
        await send_refusal(send, OVERLOADED, "overloaded", message, self.headers)


def admission_limit(default: int) -> int:
    """``KDRAY_ADMISSION_LIMIT`` when set (a positive integer), else ``default``."""
    value = os.environ.get(LIMIT_ENV, "").strip()
    if not value:
        return int(default)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{LIMIT_ENV}={value!r}: expected a positive integer")
    return int(value)


def admission_settings(layer: str) -> dict:
    """:class:`Admission`'s keyword arguments from :mod:`serve.options`, for the gate at ``layer``."""
    return {**dataclasses.asdict(ADMISSION), "retry_after_s": DEPLOYMENT.backpressure.retry_after_s, "layer": layer}


def guard_middlewares(layer: str) -> list:
    """What bounds a request at ``layer`` (``front`` or ``app``), outermost first: body limit, body deadline,
    admission, request timeout."""
    from starlette.middleware import Middleware

    from serve.body_limit import BodyLimit
    from serve.deadline import BodyDeadline, RequestTimeout

    retry_after_s = DEPLOYMENT.backpressure.retry_after_s
    return [Middleware(BodyLimit, max_bytes=MAX_BODY_BYTES),
            Middleware(BodyDeadline, timeout_s=REQUEST.body_timeout_s,
                       max_receiving_bytes=REQUEST.max_receiving_bytes, retry_after_s=retry_after_s),
            Middleware(Admission, **admission_settings(layer)),
            Middleware(RequestTimeout, timeout_s=REQUEST.request_timeout_s, retry_after_s=retry_after_s)]


def replica_middlewares() -> list:
    """Serve's HTTP callback in a replica: :func:`guard_middlewares` in front of Serve's direct-ingress entry
    point, and :class:`serve.access.Access` around them all. Serve wraps its app in list order, so the last
    middleware is the outermost (ray.serve._private.http_util._apply_middlewares)."""
    from starlette.middleware import Middleware

    from serve.access import Access

    return guard_middlewares("front")[::-1] + [Middleware(Access, layer="front")]  # innermost first


def front_gate_missing(environ=os.environ) -> str | None:
    """Why this replica's direct-ingress server will not run the front gate, or None when it will.

    A Serve config that sets ``deployments[].ray_actor_options`` replaces kdray's (Serve overrides field by
    field), and with it the replica env that names the callback. The gate inside the app still refuses then,
    at a higher cost per refusal."""
    if not _direct_ingress(environ) or environ.get(CALLBACK_ENV) == CALLBACK:
        return None
    found = environ.get(CALLBACK_ENV)
    return (f"{CALLBACK_ENV} is {found!r} in this replica, not {CALLBACK!r} (does the Serve config set "
            "ray_actor_options? it replaces kdray's runtime_env): excess requests are refused inside the app "
            "only, which costs more CPU per refusal under overload")


def _direct_ingress(environ) -> bool:
    """Whether Serve turns direct ingress on in this environment, by Ray 2.60's rule: its own switch, whose
    default is on in the throughput-optimized mode, and always on with the HAProxy mode."""
    default = "1" if environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" else "0"
    return (environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", default) == "1"
            or environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1")


def _under(scope, prefixes: tuple[str, ...]) -> bool:
    """Whether the request's path names an inference route. In front of Serve the path still carries the
    application's route prefix (``/app/predict``), which Serve strips only later, so a prefix may follow it."""
    path = scope.get("path", "")
    return any(prefix in path for prefix in prefixes)
