"""serve/metrics.py (the Prometheus series, recorded by serve/access.py), serve/readiness.py (the readiness probe)
and the ``x-kdray-model`` header.

Unit: the access middleware driven directly, the probe with fakes and with a real handler. Integration: the
deployment of tests/test_access_http.py (a tiny export with a tokens file, on the run's shared local Ray).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
import string
from pathlib import Path

import pytest

from serve import access, metrics
from serve.access import Access
from serve.options import ACCESS, METRICS, MetricsOptions
from serve.readiness import NOT_READY, TIMEOUT, Readiness
from tests.test_access import _app, _call, _header
from tests.test_access_http import TOKEN, served  # noqa: F401 - served: the live deployment with tokens

MODEL = "kdray-student:3@sha256:1a2b3c4d5e6f#int8"


@pytest.fixture
def identity(monkeypatch) -> tuple[str, str]:
    """A fresh identity (its own series) for the test; the process's is put back afterwards."""
    monkeypatch.setattr(metrics, "_served", metrics._Served())
    replica = f"test-{random.randrange(10**9)}"
    metrics.serving(MODEL, replica, "kdray-student", "3", "onnx-int8")
    return MODEL, replica


def _value(series: str, replica: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(series, {"model": MODEL, "replica": replica, **labels}) or 0.0


def _label_values(name: str, label: str, replica: str) -> set[str]:
    return {s.labels[label] for family in metrics.REGISTRY.collect() for s in family.samples
            if s.name == name and s.labels.get("replica") == replica}


def _replying(status: int, reason: bytes):
    """An inner app that refuses with ``reason`` as its x-kdray-reason, whatever that is."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"x-kdray-reason", reason)]})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


# -- unit: the series

@pytest.mark.unit
def test_a_request_updates_the_histogram_the_counters_and_the_refusals(identity) -> None:
    _, replica = identity
    ok, refused = Access(_app([]), options=ACCESS), Access(_app([], refuse="too_small"), options=ACCESS)
    for _ in range(3):
        assert _call(ok, "/predict")[0] == 200
    assert _call(refused, "/kdray/predict")[0] == 413  # in front of Serve: the route prefix
    assert _value("kdray_request_duration_seconds_count", replica, route="/predict", status="2xx") == 3
    assert _value("kdray_request_duration_seconds_bucket", replica, route="/predict", status="4xx", le="60.0") == 1
    assert _value("kdray_requests_total", replica, route="/predict", code="200") == 3
    assert _value("kdray_requests_total", replica, route="/predict", code="413") == 1
    assert _value("kdray_refusals_total", replica, reason="too_small") == 1
    assert _value("kdray_requests_in_flight", replica) == 0
    assert _value("kdray_model_info", replica, name="kdray-student", version="3", digest="sha256:1a2b3c4d5e6f",
                  backend="onnx-int8") == 1


@pytest.mark.unit
def test_requests_are_counted_in_flight_while_they_run(identity) -> None:
    _, replica = identity
    seen = []

    async def app(scope, receive, send):
        seen.append(_value("kdray_requests_in_flight", replica))
        await _app([])(scope, receive, send)

    _call(Access(app, options=ACCESS), "/predict")
    _call(Access(app, options=ACCESS), "/metrics", "GET")  # a scrape does not count itself
    assert seen == [1, 0] and _value("kdray_requests_in_flight", replica) == 0
    assert _value("kdray_requests_total", replica, route="/metrics", code="200") == 1
    assert _value("kdray_request_duration_seconds_count", replica, route="/metrics", status="2xx") == 0


@pytest.mark.unit
def test_attacker_chosen_paths_and_reasons_make_no_new_label_values(identity) -> None:
    _, replica = identity
    rng = random.Random(0)
    paths = ["/" + "".join(rng.choices(string.printable, k=rng.randrange(1, 60))) for _ in range(200)]
    paths += ["/v2/models/evil/infer/x", "/v2/models//infer", "/predict/../etc", "/v2/models/a%20b/infer"]
    assert {metrics.route_of(p) for p in paths} <= set(metrics.ROUTES)
    assert metrics.route_of("/v2/models/anything-at-all/infer") == "/v2/models/{model}/infer"
    assert metrics.route_of("/app/v2/models/kdray-student/ready") == "/v2/models/{model}/ready"
    for path in paths[:50]:
        _call(Access(_app([]), options=ACCESS), path)
    letters = string.ascii_lowercase
    reasons = [b"Evil Reason", b"x" * 41, b"drop table;", b"\xff\xfe", b"", b"fake_7"]
    reasons += [f"fake_{letters[i // 26]}{letters[i % 26]}".encode() for i in range(2 * metrics.MAX_REASONS)]
    for reason in reasons:
        _call(Access(_replying(400, reason), options=ACCESS))
    assert _label_values("kdray_requests_total", "route", replica) <= set(metrics.ROUTES)
    kept = _label_values("kdray_refusals_total", "reason", replica)
    assert "other" in kept and len(kept) == metrics.MAX_REASONS + 1
    assert all(len(r) <= 40 and set(r) <= set(string.ascii_lowercase + "_") for r in kept)
    assert _value("kdray_refusals_total", replica, reason="other") == len(reasons) - metrics.MAX_REASONS


@pytest.mark.unit
def test_metrics_off_by_environment_records_nothing(identity) -> None:
    _, replica = identity
    off = metrics.options_from_env({"KDRAY_METRICS": "0"})
    assert off == MetricsOptions(enabled=False) and metrics.options_from_env({}) == METRICS
    assert metrics.options_from_env(metrics.env_of(off)) == off
    assert metrics.options_from_env({"KDRAY_METRICS_OPEN": "1"}).open
    _call(Access(_app([]), options=ACCESS, metrics_options=off))
    assert _value("kdray_requests_total", replica, route="/predict", code="200") == 0


@pytest.mark.unit
def test_the_metrics_route_needs_the_token_unless_opened(identity, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    options = dataclasses.replace(ACCESS, tokens_file=str(tokens))
    closed = Access(_app([]), "front", options)
    opened = Access(_app([]), "front", options, MetricsOptions(open=True))
    assert _call(closed, "/metrics", "GET")[0] == 401
    assert _call(closed, "/metrics", "GET", {"authorization": f"Bearer {TOKEN}"})[0] == 200
    assert _call(opened, "/app/metrics", "GET")[0] == 200
    for path in ("/predict", "/healthz", "/v2/models/metrics", "/metrics/x"):  # only /metrics opens
        assert _call(opened, path, "GET")[0] == 401, path


@pytest.mark.unit
def test_every_response_names_the_model_refusals_too(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(access, "_served", {"model": None, "header": None})
    assert _header(_call(Access(_app([]), options=ACCESS))[1], access.MODEL_HEADER) == []  # none loaded yet
    access.serving(MODEL)
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    guarded = Access(_app([]), options=dataclasses.replace(ACCESS, tokens_file=str(tokens)))
    for status, headers, _ in (_call(Access(_app([]), options=ACCESS)), _call(guarded),
                               _call(Access(_app([], refuse="too_small"), options=ACCESS))):
        assert _header(headers, access.MODEL_HEADER) == [MODEL.encode()], status


@pytest.mark.unit
def test_explanations_are_read_from_the_gate_when_scraped(identity) -> None:
    model, replica = identity

    class Gate:
        in_flight, explained = 2, 7

    metrics.serving(model, replica, "kdray-student", "3", "onnx-int8", Gate())
    assert _value("kdray_explanations_in_flight", replica) == 2
    assert _value("kdray_explanations_total", replica) == 7
    text = metrics.exposition().decode()
    assert "# TYPE kdray_explanations_total counter" in text and "kdray_request_duration_seconds" in text


# -- unit: readiness

class _Probe:
    def __init__(self, fail: bool = False, delay_s: float = 0.0):
        self.fail, self.delay_s, self.calls = fail, delay_s, 0

    async def __call__(self) -> None:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the model is broken")


@pytest.mark.unit
def test_a_flood_of_readiness_checks_runs_one_probe_and_keeps_its_outcome() -> None:
    now = [0.0]
    probe = _Probe(delay_s=0.01)
    ready = Readiness(probe, timeout_s=2, cache_s=1, clock=lambda: now[0])

    async def flood():
        return await asyncio.gather(*(ready.check() for _ in range(50)))

    assert asyncio.run(flood()) == [None] * 50 and probe.calls == 1
    assert asyncio.run(flood()) == [None] * 50 and probe.calls == 1  # kept
    now[0] = 1.5
    assert asyncio.run(ready.check()) is None and probe.calls == 2


@pytest.mark.unit
def test_a_failing_or_slow_probe_is_not_ready_with_its_reason() -> None:
    assert asyncio.run(Readiness(_Probe(fail=True), 2, 1).check()) == NOT_READY

    async def slow():
        probe = _Probe(delay_s=0.2)
        ready = Readiness(probe, timeout_s=0.02, cache_s=1)
        first = await asyncio.gather(ready.check(), ready.check())
        again = await ready.check()  # the probe still runs: waited on, not started again
        unbounded = await ready.check(bounded=False)
        return first, again, unbounded, probe.calls

    assert asyncio.run(slow()) == ([TIMEOUT, TIMEOUT], TIMEOUT, None, 1)


@pytest.fixture(scope="module")
def handler(tiny_export):
    from serve.handler import StudentHandler

    return StudentHandler(tiny_export[0], worker_threads=1)


@pytest.mark.unit
def test_the_probe_is_an_inference_of_the_real_handler(handler, monkeypatch) -> None:
    import numpy as np

    before = handler.health().batched_images
    assert asyncio.run(Readiness(handler.probe, 2, 1).check()) is None
    assert handler.health().batched_images == before  # not counted with the requests
    for broken in (lambda x: (_ for _ in ()).throw(RuntimeError("onnxruntime failed")),
                   lambda x: np.full((len(x), 3), np.nan, dtype=np.float32)):
        monkeypatch.setattr(handler.predictor, "probabilities", broken)
        assert asyncio.run(Readiness(handler.probe, 2, 1).check()) == NOT_READY


@pytest.mark.unit
def test_readiness_routes_answer_503_with_the_reason(monkeypatch) -> None:
    from serve.app import StudentClassifier

    wrapper = StudentClassifier.func_or_class
    user_class = wrapper.__mro__[1]  # the class itself, under Serve's ingress wrapper
    assert user_class.__name__ == "StudentClassifier" and "ASGIAppReplicaWrapper" not in str(user_class.__mro__)
    replica = user_class.__new__(user_class)
    replica.readiness = Readiness(_Probe(fail=True), 2, 1)
    response = asyncio.run(replica.oip_ready())
    assert response.status_code == 503 and response.headers["x-kdray-reason"] == NOT_READY
    assert response.headers["retry-after"] == "1" and b'"reason":"not_ready"' in response.body
    with pytest.raises(RuntimeError, match="not_ready"):
        asyncio.run(replica.check_health())
    replica.readiness = Readiness(_Probe(), 2, 1)
    assert asyncio.run(replica.oip_ready()) == {"ready": True}
    assert asyncio.run(replica.check_health()) is None


# -- integration: a live deployment with authentication on

def _scrape(url: str) -> dict[str, list]:
    """name -> samples of the replica's /metrics."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    resp = requests.get(f"{url}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"] == metrics.CONTENT_TYPE, resp.text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _one_pixel_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


def _predictions(samples: dict, code: str) -> float:
    return sum(s.value for s in samples.get("kdray_requests_total", ())
               if s.labels["route"] == "/predict" and s.labels["code"] == code)


@pytest.mark.integration
def test_metrics_count_each_request_once_both_ways_and_name_the_model(served, tiny_export) -> None:
    import requests

    from tests.test_serve import _png

    direct, proxy = served
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{direct}/metrics", timeout=30).status_code == 401
    before = _scrape(direct)
    answers = [requests.post(f"{url}/predict", data=_png(seed), headers={**auth, "content-type": "image/png"},
                             timeout=60) for seed, url in enumerate((direct, direct, proxy))]
    refused = requests.post(f"{direct}/predict", data=_one_pixel_png(), timeout=60,
                            headers={**auth, "content-type": "image/png"})
    assert [a.status_code for a in answers] == [200] * 3, answers[-1].text
    assert refused.status_code == 400 and refused.json()["reason"] == "too_small"
    model = answers[0].json()["model_id"]
    assert model.startswith(f"{tiny_export[1].name}:") and "@sha256:" in model
    assert {r.headers["x-kdray-model"] for r in (*answers, refused)} == {model}
    after = _scrape(direct)
    assert _predictions(after, "200") - _predictions(before, "200") == 3  # once each, whichever way it came
    assert _predictions(after, "400") - _predictions(before, "400") == 1
    assert any(s.labels["route"] == "/predict" and s.labels["model"] == model
               for s in after["kdray_request_duration_seconds_bucket"])
    assert any(s.labels["reason"] == "too_small" and s.value >= 1 for s in after["kdray_refusals_total"])
    (info,) = after["kdray_model_info"]
    assert info.labels["digest"] == metrics.digest_of(model) and info.labels["model"] == model
    assert info.labels["replica"] and info.labels["backend"] == answers[0].json()["backend"]
    assert all(s.labels["route"] in metrics.ROUTES for s in after["kdray_requests_total"])


@pytest.mark.integration
def test_readiness_runs_through_the_model_and_liveness_stays_open(served, tiny_export) -> None:
    import requests

    direct, proxy = served
    auth = {"authorization": f"Bearer {TOKEN}"}
    name = tiny_export[1].name
    for url in (direct, proxy):
        ready = requests.get(f"{url}/v2/health/ready", headers=auth, timeout=30)
        assert ready.status_code == 200 and ready.json() == {"ready": True}, ready.text
        assert ready.headers["x-kdray-model"]
        model_ready = requests.get(f"{url}/v2/models/{name}/ready", headers=auth, timeout=30)
        assert model_ready.status_code == 200 and model_ready.json() == {"name": name, "ready": True}
        anonymous = requests.get(f"{url}/v2/health/ready", timeout=30)  # probes carry no token
        assert anonymous.status_code == 200 and anonymous.json() == {"ready": True}
        assert requests.get(f"{url}/v2/models/{name}/ready", timeout=30).status_code == 401
        assert requests.get(f"{url}/v2/health/live", timeout=30).status_code == 200
    unknown = requests.get(f"{direct}/v2/models/resnet/ready", headers=auth, timeout=30)
    assert unknown.status_code == 404 and unknown.headers["x-kdray-model"]
