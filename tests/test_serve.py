"""Ray Serve app (serve/app.py, serve/config.yaml).

The config checks are offline (unit). The HTTP tests (integration) export a ``tiny_student``
checkpoint (32 px) to ONNX with :func:`kdray.export.export_student` and deploy the export folder,
as production does, once for the module on the run's shared local Ray (127.0.0.1), on a free
loopback port, with one replica.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "serve" / "config.yaml"
CLASSES = ["covid", "normal", "pneumonia"]
IMAGE_SIZE = 32


def _png(seed: int, size: int = 48, mode: str = "L") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size + 8) if mode == "L" else (size, size + 8, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


# -- offline: the config file

def test_config_validates_and_import_path_resolves() -> None:
    import importlib

    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.proxy_location == "HeadOnly" or getattr(config.proxy_location, "value", None) == "HeadOnly"
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert app.name == "kdray" and app.route_prefix == "/"
    assert app.args["model_dir"]
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert not app.deployments  # the deployment's knobs come from serve/options.py alone
    assert app.logging_config.enable_access_log is False


def test_a_ray_started_here_gets_no_replica_it_cannot_hold(monkeypatch) -> None:
    """One node, no autoscaler: a replica past what its CPUs hold would only wait (and cost tail latency)."""
    import ray

    from serve import deploy as serve_deploy
    from serve.deploy import fitting_replicas

    assert fitting_replicas(2, 2, 2) == 1  # this box: one 2-CPU replica
    assert fitting_replicas(2, 0.5, 2) == 2 and fitting_replicas(16, 2, 4) == 4  # the bound still applies
    assert fitting_replicas(1, 2, 2) == 1  # at least one (deploy fits its CPUs to what is free)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert serve_deploy._replicas_that_fit(2.0) == 1 and serve_deploy._replicas_that_fit(1.0) == 2


def test_deployment_options_have_one_source() -> None:
    from serve import options
    from serve.app import StudentClassifier, app_builder, deployment_options

    config = StudentClassifier._deployment_config  # what @serve.deployment made of serve.options.DEPLOYMENT
    assert config.max_ongoing_requests == options.DEPLOYMENT.max_ongoing_requests
    assert config.max_queued_requests == options.DEPLOYMENT.max_queued_requests
    assert config.backpressure_config.status_code == 503 and config.backpressure_config.retry_after_s >= 1
    scaled = deployment_options(max_replicas=4, num_cpus=1)
    assert scaled["autoscaling_config"] == {**dataclasses.asdict(options.DEPLOYMENT.autoscaling), "max_replicas": 4}
    assert scaled["ray_actor_options"]["num_cpus"] == 1.0
    assert options.DEPLOYMENT.autoscaling.max_replicas != 4  # the defaults were not mutated
    app = app_builder({"model_dir": str(REPO_ROOT), "max_replicas": "4", "num_cpus": "1"})
    assert app._bound_deployment._deployment_config.autoscaling_config.max_replicas == 4


def test_a_replica_asks_for_the_cpus_its_threads_use_or_what_is_free(monkeypatch) -> None:
    import ray

    from serve import deploy, options

    assert options.DEPLOYMENT.num_cpus == options.WORKER_THREADS
    for free, expected in ((16.0, options.WORKER_THREADS), (1.7, 1.5), (0.2, 0.5)):
        monkeypatch.setattr(ray, "available_resources", lambda free=free: {"CPU": free})
        assert deploy._cpus_that_fit() == expected


def test_app_builder(tmp_path: Path) -> None:
    from ray.serve import Application

    from kdray import KdrayError
    from serve.app import app_builder

    assert isinstance(app_builder({"model_dir": str(tmp_path), "backend": "torch"}), Application)
    with pytest.raises(KdrayError, match="needs model_dir"):
        app_builder({})
    with pytest.raises(KdrayError, match="not a folder"):
        app_builder({"model_dir": str(tmp_path / "missing")})
    with pytest.raises(KdrayError, match="unknown backend"):
        app_builder({"model_dir": str(tmp_path), "backend": "tensorrt"})
    with pytest.raises(KdrayError, match="unknown argument"):
        app_builder({"model_dir": str(tmp_path), "modeldir": "x"})


# -- live: one deployment for the module

@pytest.fixture(scope="module")
def exported_student(tiny_export):
    """(export folder, model card) of an untrained tiny student; whether int8 passes depends on the CPU."""
    return tiny_export


@pytest.fixture(scope="module")
def proxy_port() -> int:
    from kdray.raycluster import free_loopback_port

    return free_loopback_port()


@pytest.fixture(scope="module")
def base_url(exported_student, ray_local, proxy_port) -> Iterator[str]:
    """The replica's own address (direct ingress, which kdray's local Ray turns on)."""
    from ray import serve

    from serve.deploy import deploy

    try:
        # 0.5 CPU: the run's shared Ray has 2, and the batching and overload tests deploy beside this app
        yield deploy(exported_student[0], port=proxy_port, num_replicas=1, num_cpus=0.5, name="kdray-test")
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def served(exported_student) -> tuple[str, float]:
    """(backend, covid threshold) the deployment must report: the served artifact's own operating point."""
    card = exported_student[1]
    return f"onnx-{card.served_artifact}", card.operating_points[card.served_artifact].covid_threshold


def _predict(url: str, data: bytes, content_type: str = "image/png", name: str = "xray.png"):
    import requests

    return requests.post(f"{url}/predict", files={"file": (name, data, content_type)}, timeout=60)


@pytest.mark.integration
def test_predict_png(base_url: str, served) -> None:
    resp = _predict(base_url, _png(1))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"label", "probabilities", "covid_suspect", "model_id", "backend"}
    probs = body["probabilities"]
    assert list(probs) == CLASSES
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert body["label"] == max(probs, key=probs.get)
    backend, threshold = served
    assert body["covid_suspect"] is (probs["covid"] >= threshold)  # not the checkpoint's own 0.3
    assert body["backend"] == backend and body["model_id"]
    # RGB and octet-stream uploads go through the same decoder
    assert _predict(base_url, _png(2, mode="RGB"), "application/octet-stream", "x.bin").status_code == 200


def _raw(url: str, data, content_type: str = "image/png", path: str = "/predict"):
    import requests

    return requests.post(f"{url}{path}", data=data, headers={"content-type": content_type}, timeout=120)


def _dicom(side: int = 64, **attributes) -> bytes:
    from cluster.local.demo_data import dicom_bytes

    pixels = np.random.default_rng(side).integers(0, 4095, (side, side), dtype=np.uint16)
    return dicom_bytes(pixels, **attributes)


@pytest.mark.integration
def test_replica_answers_directly_and_the_proxy_too(base_url: str, proxy_port: int) -> None:
    """deploy() returns the replica's own port (direct ingress); Serve's proxy serves the same routes."""
    assert base_url.startswith("http://127.0.0.1:") and f":{proxy_port}" not in base_url
    direct, proxied = _raw(base_url, _png(9)), _raw(f"http://127.0.0.1:{proxy_port}", _png(9))
    assert direct.status_code == proxied.status_code == 200
    assert direct.json() == proxied.json()


@pytest.mark.integration
def test_raw_bodies_and_dicom(base_url: str) -> None:
    as_raw = _raw(base_url, _png(1))
    assert as_raw.status_code == 200 and as_raw.json() == _predict(base_url, _png(1)).json()
    for data, kind in ((_dicom(), "application/dicom"), (_dicom(), "application/octet-stream"),
                       (_dicom(photometric="MONOCHROME1"), "image/png")):  # DICOM is judged by content
        resp = _raw(base_url, data, kind)
        assert resp.status_code == 200, resp.text
        assert list(resp.json()["probabilities"]) == CLASSES


@pytest.mark.integration
def test_accept_dicom_answers_the_sr_and_refuses_a_png(base_url: str) -> None:
    import pydicom
    import requests

    data = _dicom()
    resp = requests.post(f"{base_url}/predict", data=data, timeout=60,
                         headers={"content-type": "application/dicom", "accept": "application/dicom"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/dicom", resp.text
    sr = pydicom.dcmread(io.BytesIO(resp.content))
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
    assert resp.headers.get("x-kdray-model")
    png = requests.post(f"{base_url}/predict", data=_png(1), timeout=60,
                        headers={"content-type": "image/png", "accept": "application/dicom"})
    assert png.status_code == 406 and png.json()["reason"] == "not_dicom"
    both = requests.post(f"{base_url}/predict", data=data, timeout=60,
                         headers={"content-type": "application/dicom", "accept": "application/dicom;q=0, */*"})
    assert both.status_code == 200 and "probabilities" in both.json()


@pytest.mark.integration
@pytest.mark.parametrize("data, reason", [
    (b"\x89PNG\r\n\x1a\n definitely not a png", "truncated"),
    (b"hello, not an image", "not_an_image"),
    (b"", "not_an_image"),
    ("one-pixel", "too_small"),
    ("144-megapixels", "too_large"),
    ("dicom-ct", "wrong_modality"),
])
def test_refused_images_get_400_with_the_reason(base_url: str, data, reason: str) -> None:
    from PIL import Image

    if data == "one-pixel":
        buf = io.BytesIO()
        Image.new("L", (1, 1)).save(buf, format="PNG")
        data = buf.getvalue()
    elif data == "144-megapixels":
        from test_images import _png_header_says

        data = _png_header_says(12000, 12000)
    elif data == "dicom-ct":
        data = _dicom(modality="CT")
    resp = _raw(base_url, data, "application/octet-stream")
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["reason"] == reason
    assert "object at 0x" not in body["detail"] and "BytesIO" not in body["detail"]


@pytest.mark.integration
def test_bad_requests_then_still_serving(base_url: str) -> None:
    import requests

    text = _predict(base_url, b"hello", "text/plain", "notes.txt")  # multipart parts are judged by content
    assert text.status_code == 400 and text.json()["reason"] == "not_an_image"
    plain = _raw(base_url, b"hello", "text/plain")
    assert plain.status_code == 415 and plain.json()["reason"] == "unsupported_media_type"
    missing = requests.post(f"{base_url}/predict", files={"other": (None, "x")}, timeout=30)  # multipart, no file
    assert missing.status_code == 422 and missing.json()["reason"] == "no_file"
    form = requests.post(f"{base_url}/predict", data={"file": "x"}, timeout=30)  # a url-encoded form
    assert form.status_code == 415
    assert _raw(base_url, _png(4)).status_code == 200


@pytest.mark.integration
def test_bodies_over_the_limit_get_413(base_url: str, monkeypatch) -> None:
    from serve.options import MAX_BODY_BYTES

    big = b"\0" * (MAX_BODY_BYTES + 1)
    declared = _raw(base_url, big, "application/octet-stream")
    assert declared.status_code == 413 and declared.json()["reason"] == "body_too_large"

    def chunks():  # no Content-Length: Transfer-Encoding chunked
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]

    streamed = _raw(base_url, chunks(), "application/octet-stream")
    assert streamed.status_code == 413 and streamed.json()["reason"] == "body_too_large"
    assert _raw(base_url, _png(5)).status_code == 200


def _triton_client(base_url: str, exported_student):
    """(tritonclient.http, an unmodified client of the deployment, the model's name)."""
    from urllib.parse import urlsplit

    httpclient = pytest.importorskip("tritonclient.http")
    return httpclient, httpclient.InferenceServerClient(urlsplit(base_url).netloc), exported_student[1].name


@pytest.mark.integration
@pytest.mark.parametrize("binary", [True, False])
def test_open_inference_protocol_with_tritonclient(base_url: str, exported_student, binary: bool) -> None:
    """An unmodified tritonclient classifies a PNG and a DICOM in one request, in binary and in JSON mode."""
    httpclient, client, name = _triton_client(base_url, exported_student)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, len(CLASSES)]), "label": ("BYTES", [-1])}
    assert meta["platform"] == "onnxruntime_onnx"

    files = [_png(7), _dicom()]
    values = files if binary else [base64.b64encode(f) for f in files]
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
    result = client.infer(name, [tensor], outputs=outputs)
    probs = result.as_numpy("probabilities")
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert probs.shape == (2, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert labels == [CLASSES[i] for i in probs.argmax(1)]
    expected = [_raw(base_url, f, "application/octet-stream").json()["probabilities"] for f in files]
    assert np.allclose(probs, [[e[c] for c in CLASSES] for e in expected], atol=1e-6)


@pytest.mark.integration
def test_open_inference_protocol_errors(base_url: str, exported_student) -> None:
    import requests

    name = exported_student[1].name
    unknown = requests.get(f"{base_url}/v2/models/resnet", timeout=30)
    assert unknown.status_code == 404 and name in unknown.json()["error"]
    bad = requests.post(f"{base_url}/v2/models/{name}/infer", data=b"{oops", timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    tiny = _raw(base_url, json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [
        base64.b64encode(b"not an image").decode()]}]}), "application/json",
        f"/v2/models/{name}/infer")
    assert tiny.status_code == 400 and "image[0] refused (not_an_image)" in tiny.json()["error"]
    assert requests.get(f"{base_url}/v2/health/live", timeout=30).status_code == 200
    assert requests.get(f"{base_url}/v2", timeout=30).json()["extensions"] == ["binary_tensor_data"]


@pytest.mark.integration
def test_predict_with_explain_adds_an_overlay_and_changes_nothing_else(base_url: str) -> None:
    from PIL import Image

    plain = _raw(base_url, _png(21))
    explained = _raw(base_url, _png(21), path="/predict?explain=true")
    assert plain.status_code == explained.status_code == 200, explained.text
    body = explained.json()
    explanation = body.pop("explanation")
    assert body == plain.json()  # the same prediction, to the last digit
    assert "explanation" not in plain.json()
    assert explanation["explained_class"] == body["label"] and explanation["method"] == "grad-cam"
    assert explanation["agrees"] is (explanation["torch_class"] == body["label"])
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == (IMAGE_SIZE, IMAGE_SIZE) == (explanation["size"],) * 2
    bad = _raw(base_url, _png(21), path="/predict?explain=perhaps")
    assert bad.status_code == 400 and bad.json()["reason"] == "bad_parameter"
    refused = _raw(base_url, b"not an image", path="/predict?explain=1")
    assert refused.status_code == 400 and refused.json()["reason"] == "not_an_image"


@pytest.mark.integration
@pytest.mark.parametrize("binary", [True, False])
def test_open_inference_protocol_explain_parameter(base_url: str, exported_student, binary: bool) -> None:
    from PIL import Image

    httpclient, client, name = _triton_client(base_url, exported_student)
    files = [_png(22), _dicom()]
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(files if binary else [base64.b64encode(f) for f in files],
                                        dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label",
                                                                                 "explanation")]
    result = client.infer(name, [tensor], outputs=outputs, parameters={"explain": True})
    plain = client.infer(name, [tensor], outputs=outputs[:2])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), plain.as_numpy("probabilities"))
    overlays = [v if binary else base64.b64decode(v) for v in result.as_numpy("explanation")]
    assert [Image.open(io.BytesIO(o)).size for o in overlays] == [(IMAGE_SIZE, IMAGE_SIZE)] * 2
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert result.get_response()["parameters"]["explained_class"] == ",".join(labels)
    assert plain.as_numpy("explanation") is None


@pytest.mark.integration
def test_health_docs_index(base_url: str, served) -> None:
    import requests

    health = requests.get(f"{base_url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["classes"] == CLASSES
    assert health["backend"].startswith("onnx-") and health["backend"] == served[0]  # the export, never torch
    assert health["model_id"] and health["threads"] == 1  # num_cpus 0.5 rounds up to 1
    assert requests.get(f"{base_url}/docs", timeout=30).status_code == 200
    assert "/predict" in requests.get(f"{base_url}/openapi.json", timeout=30).json()["paths"]
    assert requests.get(f"{base_url}/", timeout=30).json()["docs"] == "/docs"


@pytest.mark.integration
def test_cpu_replicas_classify_one_image_per_call(base_url: str) -> None:
    """On a CPU batching is off (it does not pay there): 8 simultaneous clients, 8 single-image model calls."""
    import requests

    before = requests.get(f"{base_url}/healthz", timeout=30).json()
    assert before["batching"] is False
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: _raw(base_url, _png(100 + seed)), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    after = requests.get(f"{base_url}/healthz", timeout=30).json()
    assert after["batched_images"] - before["batched_images"] == 8
    assert after["batches"] - before["batches"] == 8 and after["max_batch_size_seen"] == 1


@pytest.mark.integration
def test_batching_on_groups_concurrent_requests(exported_student, base_url, proxy_port) -> None:
    """The GPU path (batching on), run here on the CPU: simultaneous requests share model calls."""
    import requests
    from ray import serve

    from serve.deploy import deploy

    url = deploy(exported_student[0], port=proxy_port, num_replicas=1, num_cpus=0.5, batching="on", name="kdray-batched",
                 route_prefix="/batched")
    try:
        images = [_png(100 + i) for i in range(8)]
        for _ in range(3):
            with ThreadPoolExecutor(8) as pool:
                responses = list(pool.map(lambda data: _raw(url, data), images))
            assert [r.status_code for r in responses] == [200] * 8
            health = requests.get(f"{url}/healthz", timeout=30).json()
            if health["max_batch_size_seen"] > 1:
                break
        assert health["batching"] is True and health["max_batch_size_seen"] > 1, health
        assert health["batched_images"] > health["batches"]
        single = _raw(url, _png(100)).json()["probabilities"]
        assert single == pytest.approx(_raw(base_url, _png(100)).json()["probabilities"], abs=1e-5)
    finally:
        serve.delete("kdray-batched")


def _burst_until_refused(url: str, size: int = 24, tries: int = 3) -> list:
    """``size`` DICOM uploads at once, up to ``tries`` times until one of them is answered 503; the last burst."""
    burst = [_dicom(256) for _ in range(size)]
    for _ in range(tries):
        with ThreadPoolExecutor(len(burst)) as pool:
            responses = list(pool.map(lambda data: _raw(url, data, "application/dicom"), burst))
        if any(r.status_code == 503 for r in responses):
            break
    return responses


@pytest.mark.integration
def test_admission_refuses_in_front_of_serve(exported_student, base_url, proxy_port) -> None:
    """kdray's admission limit (here 1) refuses at the replica's direct-ingress server, before Serve's entry point:
    503 + Retry-After marked ``x-kdray-refused-by: front``; health stays answered; never another 5xx."""
    from ray import serve

    from serve.deploy import deploy

    url = deploy(exported_student[0], port=proxy_port, num_replicas=1, num_cpus=0.5, name="kdray-admission",
                 route_prefix="/admission", admission_limit=1)
    try:
        responses = _burst_until_refused(url)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        refused = [r for r in responses if r.status_code == 503]
        assert {r.headers.get("x-kdray-refused-by") for r in refused} == {"front"}, [r.headers for r in refused]
        assert all(r.headers.get("retry-after") == "1" and r.json()["reason"] == "overloaded" for r in refused)
        import requests

        assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200
    finally:
        serve.delete("kdray-admission")


@pytest.mark.integration
def test_overload_is_shed_with_503_and_retry_after(exported_student, base_url, proxy_port) -> None:
    """One request at a time, one queued: the rest of a burst gets 503 + Retry-After at once, never another 5xx."""
    from ray import serve

    from serve.deploy import deploy

    url = deploy(exported_student[0], port=proxy_port, num_replicas=1, num_cpus=0.5, name="kdray-overload", route_prefix="/overload",
                 max_ongoing_requests=1, max_queued_requests=1)
    try:
        responses = _burst_until_refused(url)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    finally:
        serve.delete("kdray-overload")
