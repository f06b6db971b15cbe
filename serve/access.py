"""ASGI middleware: each request's id, its guard (:mod:`serve.auth`) and its line in the access log.

Two copies run, as with the admission gate: ``front`` at the replica's direct-ingress server (Serve's HTTP
callback, :func:`serve.admission.replica_middlewares`) and ``app`` inside the FastAPI app. Exactly one acts on a
request: the front marks each request it handled with a header holding a secret of this process
(:data:`MARK`), and the app copy passes marked requests through untouched. A request that came another way
(Serve's proxy, the replica's inter-deployment gRPC server, direct ingress off) has no valid mark, so the app
copy guards and logs it. A client cannot forge the mark: the secret never leaves the process, and the front
drops any copy a client sends.

* **Request id:** the client's ``X-Request-ID`` when it is sane (at most ``max_request_id_chars`` of
  ``[A-Za-z0-9._:-]``), else a new uuid4 hex. The front puts it into the request before Serve's own
  RequestIdMiddleware, which then uses it for Serve's logs and sets it on the response; the front keeps
  exactly one on the response. Behind Serve's proxy the proxy sets the response's header itself.
* **Access log** (``log``): one JSON line per request on the ``kdray.access`` logger: ``id``, ``method``,
  ``route`` (the path, never the query string), ``status``, ``latency_ms``, ``bytes_in``, ``bytes_out``,
  ``reason`` (the response's ``x-kdray-reason``: every kdray refusal carries one), ``model`` (what the replica
  serves) and ``via`` (the copy that logged). Never a body, a query string, a token or any other header. In a
  Ray worker it goes to ``<Ray logs dir>/serve/kdray_access_<pid>.jsonl``, beside Serve's replica logs (not
  to stdout, which Serve routes through its logger and Ray streams to the driver); elsewhere to stderr.
* **Metrics** (:mod:`serve.metrics`, unless ``KDRAY_METRICS=0``): the same request, recorded once, into the
  replica's Prometheus series. ``/metrics`` needs a token like every other route unless ``KDRAY_METRICS_OPEN=1``.
* **Which model answered:** every response carries ``x-kdray-model`` (the model id) once the replica has loaded
  its model, refusals and Open Inference Protocol answers too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import logging.handlers
import os
import re
import secrets
import sys
import time
import uuid

from serve import metrics
from serve.auth import Guard
from serve.options import ACCESS, AccessOptions, MetricsOptions
from serve.refusal import REASON_HEADER, send_refusal

log = logging.getLogger("kdray.access")

#: The header by which the front tells the app copy, in the same process, that it handled the request.
MARK_HEADER = b"x-kdray-access"
MARK = secrets.token_hex(16).encode()
REQUEST_ID = b"x-request-id"
MODEL_HEADER = b"x-kdray-model"
ENV = {"tokens_file": "KDRAY_AUTH_TOKENS_FILE", "allowed_origins": "KDRAY_ALLOWED_ORIGINS",
       "allowed_hosts": "KDRAY_ALLOWED_HOSTS", "log": "KDRAY_ACCESS_LOG"}
CORS_PREFLIGHT = ((b"access-control-allow-methods", b"GET, POST"),
                  (b"access-control-allow-headers", b"authorization, content-type, x-request-id"),
                  (b"access-control-max-age", b"600"))
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]+")
_served = {"model": None, "header": None}


def serving(model: str) -> None:
    """Name the model this process serves, for its log lines and ``x-kdray-model`` (the replica calls it once
    loaded)."""
    _served["model"], _served["header"] = model, model.encode("latin-1", "replace")


def options_from_env(environ=os.environ, base: AccessOptions = ACCESS) -> AccessOptions:
    """``base`` with what the environment sets (the replica's runtime env; see :func:`env_of`)."""
    changes: dict = {}
    if value := environ.get(ENV["tokens_file"], "").strip():
        changes["tokens_file"] = value
    for field in ("allowed_origins", "allowed_hosts"):
        if (value := environ.get(ENV[field])) is not None:
            changes[field] = tuple(v.strip() for v in value.split(",") if v.strip())
    if (value := environ.get(ENV["log"], "").strip()) != "":
        changes["log"] = value
    return dataclasses.replace(base, **changes)


def env_of(options: AccessOptions) -> dict[str, str]:
    """The environment variables that make every replica use ``options`` (:func:`options_from_env`)."""
    env = {ENV["log"]: "1" if options.log else "0",
           ENV["allowed_origins"]: ",".join(options.allowed_origins),
           ENV["allowed_hosts"]: ",".join(options.allowed_hosts)}
    if options.tokens_file:
        env[ENV["tokens_file"]] = os.path.abspath(os.path.expanduser(options.tokens_file))
    return env


@functools.cache
def process_settings() -> tuple[AccessOptions, Guard]:
    """This process's options and guard, read once (the tokens file too: a replica restart rereads it)."""
    options = options_from_env()
    return options, Guard(options)


def request_id(given: bytes | None, max_chars: int) -> bytes:
    if given and len(given) <= max_chars and _SANE_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex.encode()


class Access:
    def __init__(self, app, layer: str = "app", options: AccessOptions | None = None,
                 metrics_options: MetricsOptions | None = None):
        self.app, self.layer = app, layer
        self.options, self.guard = (options, Guard(options)) if options is not None else process_settings()
        self.metrics = metrics_options if metrics_options is not None else metrics.process_options()
        if self.options.log:
            _install_handler(self.options)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        if self.layer == "app" and headers.get(MARK_HEADER) == MARK:
            return await self.app(scope, receive, send)
        rid = request_id(headers.get(REQUEST_ID), self.options.max_request_id_chars)
        serve_sets_id = self.layer == "app" and REQUEST_ID in headers  # behind Serve: it sets the response's id
        scope = dict(scope, headers=self._forwarded(scope, rid))
        started, seen = time.perf_counter(), {"in": 0, "out": 0, "status": None, "reason": None}
        tracked = metrics.Tracked(scope.get("path", "")) if self.metrics.enabled else None
        origin = headers.get(b"origin")
        cors = self.guard.allows_origin(origin)

        async def counting_receive():
            message = await receive()
            seen["in"] += len(message.get("body", b""))
            return message

        async def tagging_send(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID or serve_sets_id]
                if not serve_sets_id:
                    kept.append((REQUEST_ID, rid))
                if _served["header"] is not None:
                    kept.append((MODEL_HEADER, _served["header"]))
                if cors:
                    kept += [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
                seen["status"] = message["status"]
                seen["reason"] = next((v for k, v in kept if k.lower() == REASON_HEADER), None)
                message = {**message, "headers": kept}
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            metrics_open = tracked is not None and self.metrics.open and tracked.route == metrics.METRICS_ROUTE
            refused = None if metrics_open else self.guard.check(scope.get("path", ""), headers)
            if refused is not None:
                await send_refusal(tagging_send, refused.status, refused.reason, refused.message, refused.headers)
            elif cors and scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers:
                await tagging_send({"type": "http.response.start", "status": 204, "headers": list(CORS_PREFLIGHT)})
                await tagging_send({"type": "http.response.body", "body": b""})
            else:
                await self.app(scope, counting_receive, tagging_send)
        finally:
            if tracked is not None:
                tracked.end(seen["status"], seen["reason"])
            if self.options.log:
                self._log(scope, rid, seen, started)

    def _forwarded(self, scope, rid: bytes) -> list:
        """The request's headers as the next layer sees them: the sane id; the front's mark, never a client's."""
        kept = [(k, v) for k, v in scope.get("headers", ()) if k not in (MARK_HEADER, REQUEST_ID)]
        kept.append((REQUEST_ID, rid))
        if self.layer == "front":
            kept.append((MARK_HEADER, MARK))
        return kept

    def _log(self, scope, rid: bytes, seen: dict, started: float) -> None:
        reason = seen["reason"]
        log.info(json.dumps({
            "id": rid.decode(), "method": str(scope.get("method", ""))[:16], "route": scope.get("path", "")[:200],
            "status": seen["status"] if seen["status"] is not None else 500,
            "latency_ms": round(1000 * (time.perf_counter() - started), 2), "bytes_in": seen["in"],
            "bytes_out": seen["out"], "reason": reason.decode("latin-1")[:64] if reason else None,
            "model": _served["model"], "via": self.layer}))


def _install_handler(options: AccessOptions) -> None:
    """Once per process: the ``kdray.access`` logger writes bare lines to its own file (see the module doc),
    rotated as Ray rotates its logs."""
    if log.handlers:
        return
    from kdray import ray_private

    folder = ray_private.logs_dir()
    if folder:
        os.makedirs(os.path.join(folder, "serve"), exist_ok=True)
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            os.path.join(folder, "serve", f"kdray_access_{os.getpid()}.jsonl"), maxBytes=options.log_max_bytes,
            backupCount=options.log_backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
