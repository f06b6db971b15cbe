"""Ray Serve app (serve/app.py, serve/config.yaml).

The config checks are offline (unit). The HTTP tests (integration) export a ``tiny_student``
checkpoint (32 px) to ONNX with :func:`kdray.export.export_student` and deploy the export folder,
as production does, once for the module on the run's shared local Ray (127.0.0.1), on a free
loopback port, with one replica.
"""

from __future__ import annotations

import io
import socket
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    (dep,) = app.deployments
    assert dep.name == "StudentClassifier"
    assert dep.max_ongoing_requests == 16
    assert dep.ray_actor_options.num_cpus == 0.5
    assert dep.autoscaling_config["max_replicas"] == 2
    assert app.logging_config.enable_access_log is False


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
def exported_student(tmp_path_factory: pytest.TempPathFactory):
    """(export folder, model card) of an untrained tiny student; whether int8 passes depends on the CPU."""
    from conftest import make_checkpoint
    from kdray.export import export_student
    from kdray.synthetic import make_image

    root = tmp_path_factory.mktemp("serve")
    checkpoint = make_checkpoint(root / "checkpoint", "tiny_student", image_size=IMAGE_SIZE, covid_threshold=0.3)
    rng = np.random.default_rng(0)
    labels = np.arange(30) % len(CLASSES)
    images = np.stack([make_image(CLASSES[y], IMAGE_SIZE, rng) for y in labels])
    card = export_student(checkpoint, str(root / "export"), images, images, labels, strict=False)
    return str(root / "export"), card


@pytest.fixture(scope="module")
def base_url(exported_student, ray_local) -> Iterator[str]:
    from ray import serve

    from serve.app import deploy

    try:
        yield deploy(exported_student[0], port=_free_port(), num_replicas=1, name="kdray-test")
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


@pytest.mark.integration
def test_bad_uploads_then_still_serving(base_url: str) -> None:
    import requests

    corrupt = _predict(base_url, b"\x89PNG\r\n\x1a\n definitely not a png")
    assert corrupt.status_code == 400 and corrupt.json()["detail"].startswith("cannot decode image")
    truncated = _predict(base_url, _png(3)[:60])
    assert truncated.status_code == 400 and "cannot decode" in truncated.json()["detail"]
    text = _predict(base_url, b"hello", "text/plain", "notes.txt")
    assert text.status_code == 415 and "text/plain" in text.json()["detail"]
    dicom = _predict(base_url, b"DICM", "application/dicom", "x.dcm")
    assert dicom.status_code == 415 and "DICOM" in dicom.json()["detail"]
    missing = requests.post(f"{base_url}/predict", data={"other": "x"}, timeout=30)
    assert missing.status_code == 422
    assert _predict(base_url, _png(4)).status_code == 200


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
def test_concurrent_requests_are_batched(base_url: str) -> None:
    """8 simultaneous clients: all answered, and @serve.batch grouped some (up to 3 rounds on a busy box)."""
    import requests

    images = [_png(100 + i) for i in range(8)]
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda data: _predict(base_url, data), images))
        assert [r.status_code for r in responses] == [200] * 8
        health = requests.get(f"{base_url}/healthz", timeout=30).json()
        if health["max_batch_size_seen"] > 1:
            break
    assert health["max_batch_size_seen"] > 1, health
    assert health["batched_images"] > health["batches"]
