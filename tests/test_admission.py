"""serve/admission.py: at most `limit` inference requests at once; the excess is held, then 503 + Retry-After."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serve.admission import Admission

pytestmark = pytest.mark.unit


def test_excess_is_held_then_refused_and_other_routes_pass() -> None:
    release = asyncio.Event()
    served = []

    async def app(scope, receive, send):
        if "predict" in scope["path"]:
            await release.wait()
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = Admission(app, limit=2, hold_s=0.05, retry_after_s=0.4, prefixes=("/predict", "/v2/models"))

    async def call(path: str, method: str = "POST", root: str = ""):
        sent = []

        async def send(message):
            sent.append(message)

        started = time.perf_counter()
        await gate({"type": "http", "method": method, "path": root + path, "root_path": root}, None, send)
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"], time.perf_counter() - started

    async def scenario():
        first = [asyncio.create_task(call("/predict")), asyncio.create_task(call("/predict", root="/x"))]
        await asyncio.sleep(0.01)
        assert gate.in_flight == 2
        status, headers, body, took = await call("/v2/models/m/infer")
        assert status == 503 and headers[b"retry-after"] == b"1" and json.loads(body)["reason"] == "overloaded"
        assert took >= 0.05  # held before the refusal
        assert (await call("/healthz", method="GET"))[0] == 200  # never held back
        assert (await call("/v2/models/m", method="GET"))[0] == 200  # metadata is a GET
        release.set()
        assert [(await t)[0] for t in first] == [200, 200]
        assert gate.in_flight == 0 and gate.rejected == 1
        assert (await call("/predict"))[0] == 200  # capacity is back

    asyncio.run(scenario())
    assert served.count("/predict") == 2 and served.count("/x/predict") == 1
