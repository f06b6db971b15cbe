"""The viewer (serve/viewer.py, serve/viewer/) in a real browser: headless Chromium loads ``GET /`` from a live
local deploy with authentication on, and a person's steps are played: the page loads without a token, a file
sent without one shows why it was refused, then with the token a real chest X-ray PNG and a DICOM each show
their label, probabilities and overlay, and a 1×1 PNG its reason in plain words. The token is never stored.

Set ``KDRAY_SCREENSHOTS=docs`` to refresh docs/viewer.png."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from browser import chromium, keep_screenshot
from PIL import Image

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
CXR = REPO.parent / "shared" / "datasets" / "cxr" / "val"
TOKEN = "viewer-token-0123456789abcdef"


def _real_or_made_cxr(tmp: Path) -> tuple[Path, np.ndarray]:
    """A real chest X-ray PNG from the shared dataset (a made one where the dataset is not there), and its
    pixels as uint16 for a DICOM of the same image."""
    real = sorted((CXR / "covid").glob("*.png"))[:1] if CXR.is_dir() else []
    if real:
        path = real[0]
    else:
        from cluster.local.demo_data import make_image

        path = tmp / "made-cxr.png"
        Image.fromarray(make_image("covid", 256, np.random.default_rng(0))).save(path)
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16  # 12 bits
    return path, grey


@pytest.fixture(scope="module")
def viewer_url(tiny_export, ray_local, tmp_path_factory) -> Iterator[str]:
    from ray import serve

    from kdray.raycluster import free_loopback_port
    from serve.deploy import deploy
    from serve.options import DEPLOYMENT

    tokens = tmp_path_factory.mktemp("viewer") / "tokens"
    tokens.write_text(TOKEN + "\n")
    actor = DEPLOYMENT.serve_options()["ray_actor_options"]
    actor["num_cpus"] = 0.5
    actor["runtime_env"]["env_vars"]["KDRAY_AUTH_TOKENS_FILE"] = str(tokens)
    try:
        yield deploy(tiny_export[0], port=free_loopback_port(), num_replicas=1, name="kdray-viewer",
                     ray_actor_options=actor)
    finally:
        serve.shutdown()


def test_the_page_is_open_and_nothing_else_is(viewer_url: str) -> None:
    import requests

    page = requests.get(f"{viewer_url}/", headers={"accept": "text/html"}, timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert '"too_small"' in page.text  # the reason words, written into the page
    for asset in ("viewer.js", "viewer.css"):
        assert requests.get(f"{viewer_url}/{asset}", timeout=30).status_code == 200
    # the JSON index, the card and the model stay behind the token
    for path in ("/", "/model", "/healthz"):
        assert requests.get(f"{viewer_url}{path}", timeout=30).status_code == 401, path
    card = requests.get(f"{viewer_url}/model", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert card["intended_use"] and card["known_biases"] and card["model_id"]


def _upload(driver, path: Path) -> None:
    driver.execute_script("document.getElementById('status').textContent = ''")  # so a wait sees the new answer
    driver.find_element("id", "file").send_keys(str(path))


def _wait_status(driver, text: str, timeout: float = 60) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element("id", "status").text)
    return driver.find_element("id", "status").text


SHOWN = """
const text = (id) => document.getElementById(id).textContent;
const rows = [...document.querySelectorAll('#probabilities tbody tr')];
return {label: text('label'), suspect: text('suspect'), threshold: text('threshold'), caption: text('image-caption'),
        probabilities: Object.fromEntries(rows.map(r => [r.dataset.class,
                                                          parseFloat(r.querySelector('.probability').textContent)])),
        image_width: document.getElementById('image').naturalWidth,
        overlay_width: document.getElementById('overlay').naturalWidth,
        alts: ['image', 'overlay'].map(id => document.getElementById(id).alt)};
"""


def test_a_person_drops_xrays_on_the_page(viewer_url: str, tiny_export, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    from cluster.local.demo_data import dicom_bytes

    card = tiny_export[1]
    png, grey = _real_or_made_cxr(tmp_path)
    dicom = tmp_path / "xray.dcm"
    dicom.write_bytes(dicom_bytes(grey, modality="DX"))
    tiny = tmp_path / "one-pixel.png"
    Image.new("L", (1, 1)).save(tiny)

    with chromium() as driver:
        driver.get(f"{viewer_url}/")
        assert "kdray" in driver.title
        _wait_status(driver, "needs an access token")  # the card asked without a token
        driver.find_element("tag name", "body").send_keys(Keys.TAB)  # the keyboard reaches the file picker first
        assert driver.switch_to.active_element.get_attribute("id") == "file"

        _upload(driver, png)  # without the token
        assert "auth_required" in _wait_status(driver, "auth_required")

        driver.find_element("id", "token").send_keys(TOKEN, Keys.TAB)  # change → the card loads
        _upload(driver, png)
        _wait_status(driver, "Done")
        shown = driver.execute_script(SHOWN)
        assert shown["label"] in card.classes and set(shown["probabilities"]) == set(card.classes)
        assert abs(sum(shown["probabilities"].values()) - 100) < 0.5
        assert shown["image_width"] > 0 and shown["overlay_width"] == card.image_size
        assert all(shown["alts"]) and shown["suspect"].startswith("covid_suspect: ")
        threshold = card.operating_points[card.served_artifact].covid_threshold
        assert f"{threshold:.3f}" in shown["threshold"]
        assert driver.find_element("id", "card-name").text == card.name
        assert driver.find_element("id", "card-use").text == card.intended_use
        keep_screenshot(driver, tmp_path / "viewer.png", "viewer.png")

        _upload(driver, dicom)
        _wait_status(driver, "Done")
        shown = driver.execute_script(SHOWN)
        assert "as the model saw it" in shown["caption"]
        assert shown["image_width"] == card.image_size == shown["overlay_width"]

        _upload(driver, tiny)
        status = _wait_status(driver, "too_small")
        assert "too small" in status.lower() and "400" in status

        stored = driver.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
        assert stored == [0, 0, ""], stored


def test_an_overloaded_server_is_retried_after_its_retry_after(tmp_path: Path) -> None:
    """The page alone, against a scripted server on loopback: /predict answers 503 + Retry-After twice, then the
    answer; the page says it is busy, waits, retries and shows the answer without a click."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serve.viewer import FILES

    answers = [(503, {"detail": "busy", "reason": "overloaded"})] * 2 + [(200, {
        "label": "normal", "probabilities": {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1}, "covid_suspect": False,
        "model_id": "m", "backend": "onnx-fp32", "explanation": None})]
    posts = []

    class Scripted(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: bytes, media_type: str, headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in {"content-type": media_type, "content-length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path in FILES:
                self._send(200, *FILES[self.path])
            else:
                self._send(404, b"{}", "application/json")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            posts.append(time.monotonic())
            status, body = answers[min(len(posts), len(answers)) - 1]
            self._send(status, json.dumps(body).encode(), "application/json",
                       {"retry-after": "1"} if status == 503 else None)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    png = tmp_path / "x.png"
    Image.new("L", (64, 64), 128).save(png)
    try:
        with chromium() as driver:
            driver.get(f"http://127.0.0.1:{server.server_port}/")
            _upload(driver, png)
            assert "busy" in _wait_status(driver, "Trying again in 1 s", timeout=20)
            _wait_status(driver, "Done: normal", timeout=20)
    finally:
        server.shutdown()
    assert len(posts) == 3 and posts[2] - posts[0] >= 1.9  # each retry waited its Retry-After
