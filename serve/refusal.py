"""The JSON refusal the ASGI middlewares send themselves (413 body too large, 503 overloaded).

The body carries ``detail`` and ``reason`` as ``/predict``'s refusals do, and ``error`` as the Open Inference
Protocol's do, so that either kind of client reads it."""

from __future__ import annotations

import json
import math

#: The response header that carries a refusal's reason code (kdray's own refusals all set it), for the access log.
REASON_HEADER = b"x-kdray-reason"


def retry_after(seconds: float) -> tuple[bytes, bytes]:
    """The ``Retry-After`` header every 503 carries: whole seconds (what the header allows), at least 1."""
    return b"retry-after", str(max(1, math.ceil(seconds))).encode()


async def send_refusal(send, status: int, reason: str, message: str, headers: tuple = ()) -> None:
    body = json.dumps({"detail": message, "error": message, "reason": reason}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (REASON_HEADER, reason.encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
