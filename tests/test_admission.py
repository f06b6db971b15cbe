"""serve/admission.py: at most `limit` inference requests at once; the excess is held, then 503 + Retry-After."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from serve.admission import (CALLBACK, CALLBACK_ENV, LIMIT_ENV, Admission, admission_limit, front_gate_missing,
                             guard_middlewares)
from serve.body_limit import BodyLimit
from serve.deadline import BodyDeadline, RequestTimeout

pytestmark = pytest.mark.unit
#: The guards of both layers, outermost first: the body is received (bounded, in time) before a slot is taken.
GUARDS = [BodyLimit, BodyDeadline, Admission, RequestTimeout]


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


def test_front_sees_the_route_prefix_and_says_it_refused(monkeypatch) -> None:
    """In front of Serve the path still carries the app's route prefix; refusals name the layer that made them."""
    async def app(scope, receive, send):
        raise AssertionError("a refused request must not reach the app")

    gate = Admission(app, limit=1, hold_s=0.0, retry_after_s=1, prefixes=("/predict",), layer="front")
    gate.in_flight = 1
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(gate({"type": "http", "method": "POST", "path": "/kdray/predict", "root_path": ""}, None, send))
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"x-kdray-refused-by"] == b"front"


def test_limit_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(LIMIT_ENV, "3")
    assert Admission(None, limit=64, hold_s=0, retry_after_s=1, prefixes=()).limit == 3
    monkeypatch.setenv(LIMIT_ENV, "zero")
    with pytest.raises(ValueError, match=LIMIT_ENV):
        admission_limit(64)
    monkeypatch.delenv(LIMIT_ENV)
    assert admission_limit(64) == 64


def test_replicas_name_the_front_as_serves_http_callback() -> None:
    """The replica's runtime env names a callback that imports and returns the front Admission."""
    from ray.serve._private.utils import call_function_from_import_path

    from serve.app import deployment_options
    from serve.options import DEPLOYMENT

    env = DEPLOYMENT.serve_options()["ray_actor_options"]["runtime_env"]["env_vars"]
    middlewares = call_function_from_import_path(env[CALLBACK_ENV])
    # Serve wraps its app in list order (the last is outermost): the guards must come out outermost first
    outermost_first = [m for m in reversed(middlewares) if m.cls in GUARDS]
    assert [m.cls for m in outermost_first] == GUARDS
    assert outermost_first[GUARDS.index(Admission)].kwargs["layer"] == "front"
    scaled = deployment_options(num_cpus=1, admission_limit=5)["ray_actor_options"]
    assert scaled["runtime_env"]["env_vars"] == {CALLBACK_ENV: CALLBACK, LIMIT_ENV: "5"}
    assert LIMIT_ENV not in env  # the shared default is left alone


def test_the_app_runs_the_same_guards_in_the_same_order() -> None:
    from serve.app import fastapi_app

    app_guards = [m for m in fastapi_app.user_middleware if m.cls in GUARDS]  # user_middleware: outermost first
    assert [m.cls for m in app_guards] == GUARDS == [m.cls for m in guard_middlewares("app")]
    assert app_guards[GUARDS.index(Admission)].kwargs["layer"] == "app"


def test_a_replica_without_the_callback_says_its_front_gate_is_off() -> None:
    direct = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
    assert front_gate_missing({**direct, CALLBACK_ENV: CALLBACK}) is None
    assert front_gate_missing({}) is None  # no direct ingress: Serve's proxy, and the app's gate, answer
    message = front_gate_missing(direct)
    assert message is not None and CALLBACK in message and "ray_actor_options" in message
    assert "'other:hook'" in front_gate_missing({**direct, CALLBACK_ENV: "other:hook"})
    # the throughput-optimized mode turns direct ingress on by default (kdray's nodes set both)
    assert front_gate_missing({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}) is not None
    assert front_gate_missing({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}) is None
