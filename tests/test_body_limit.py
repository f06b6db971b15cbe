"""serve/body_limit.py: bodies over the limit are refused from Content-Length, or as a chunked body streams."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.body_limit import BodyLimit

pytestmark = pytest.mark.unit
LIMIT = 100


class Recorder:
    """An app that reads the whole body, then answers 200 with its length."""

    def __init__(self):
        self.read = 0

    async def __call__(self, scope, receive, send):
        more = True
        while more:
            message = await receive()
            self.read += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(self.read).encode()})


def _call(chunks: list[bytes], content_length: int | None):
    app = Recorder()
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    pulled, sent = [], []

    async def receive():
        pulled.append(pending.pop(0))
        return pulled[-1]

    async def send(message):
        sent.append(message)

    asyncio.run(BodyLimit(app, LIMIT)(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], app.read, len(pulled)


def test_under_the_limit_passes_through() -> None:
    assert _call([b"x" * 60, b"y" * 40], 100)[:3] == (200, b"100", 100)
    assert _call([b"x" * 60, b"y" * 40], None)[:3] == (200, b"100", 100)


def test_content_length_over_the_limit_is_refused_unread() -> None:
    status, body, read, pulled = _call([b"x" * 101], 101)
    assert (status, read, pulled) == (413, 0, 0)  # not a byte of the body was received
    refusal = json.loads(body)
    assert refusal["reason"] == "body_too_large" and "101 bytes" in refusal["detail"]


def test_chunked_body_is_capped_as_it_streams() -> None:
    status, body, read, pulled = _call([b"x" * 60, b"y" * 60, b"z" * 60], None)
    assert status == 413 and pulled == 2  # stopped at the chunk that crossed the limit; the third never read
    assert read == 60 and json.loads(body)["reason"] == "body_too_large"


def test_other_scopes_pass_through() -> None:
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(BodyLimit(app, LIMIT)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]
