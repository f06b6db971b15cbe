"""serve/access.py and serve/auth.py over HTTP: a tiny export deployed on the run's shared local Ray with a tokens
file (``KDRAY_AUTH_TOKENS_FILE`` in the replica's environment, as a KubeRay pod sets it), called both ways: the
replica's own port (the front copy of :class:`serve.access.Access`) and Serve's proxy (the copy in the app).

Only old interfaces are used to deploy, so that the same file shows what the code before authentication did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_serve import _png

TOKEN = "live-token-0123456789abcdef"


@pytest.fixture(scope="module")
def served(tiny_export, ray_local, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """(the replica's own URL, Serve's proxy URL) of a deployment with a tokens file and the access log on."""
    from ray import serve

    from kdray.raycluster import free_loopback_port
    from serve.deploy import deploy
    from serve.options import DEPLOYMENT

    tokens = tmp_path_factory.mktemp("access") / "tokens"
    tokens.write_text(TOKEN + "\n")
    actor = DEPLOYMENT.serve_options()["ray_actor_options"]
    actor["num_cpus"] = 0.5
    actor["runtime_env"]["env_vars"]["KDRAY_AUTH_TOKENS_FILE"] = str(tokens)
    port = free_loopback_port()
    try:
        yield (deploy(tiny_export[0], port=port, num_replicas=1, name="kdray-access", ray_actor_options=actor),
               f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()


def _logged(rid: str, wait_s: float = 10.0) -> list[dict]:
    """The access-log lines of request ``rid`` in this node's Ray logs (once one appears, a moment more for any
    second one)."""
    from kdray.ray_private import logs_dir

    folder = Path(logs_dir()) / "serve"

    def lines() -> list[dict]:
        return [json.loads(line) for f in folder.glob("kdray_access_*.jsonl") for line in f.read_text().splitlines()
                if rid in line]

    deadline = time.time() + wait_s
    while time.time() < deadline and not lines():
        time.sleep(0.2)
    time.sleep(0.5)
    return lines()


@pytest.mark.integration
def test_anonymous_requests_are_refused_both_ways_and_each_is_logged_once(served) -> None:
    import requests

    direct, proxy = served
    assert direct != proxy  # direct ingress: the front copy answers on the replica's port
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "image/png"}
    for url, via in ((direct, "front"), (proxy, "app")):
        anonymous = requests.post(f"{url}/predict", data=_png(1), headers={"content-type": "image/png"}, timeout=60)
        assert anonymous.status_code == 401 and anonymous.json()["reason"] == "auth_required", anonymous.text
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        wrong = requests.post(f"{url}/predict", data=_png(1), timeout=60,
                              headers={**auth, "authorization": "Bearer " + TOKEN[::-1]})
        assert wrong.status_code == 401 and wrong.json()["reason"] == "auth_invalid"
        assert requests.get(f"{url}/healthz", timeout=30).status_code == 401
        assert requests.get(f"{url}/v2/health/live", timeout=30).status_code == 200
        evil = requests.post(f"{url}/predict", data=_png(1), headers={**auth, "origin": "https://evil.example"},
                             timeout=60)
        assert evil.status_code == 403 and evil.json()["reason"] == "origin_not_allowed"
        assert not any(h.startswith("access-control-") for h in evil.headers)
        rid = f"access-test-{via}-{time.time_ns()}"
        ok = requests.post(f"{url}/predict?explain=false", data=_png(1), headers={**auth, "x-request-id": rid},
                           timeout=60)
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-request-id"] == rid  # one header (requests joins repeated ones with commas)
        lines = _logged(rid)
        assert len(lines) == 1, lines  # exactly one line, whichever way the request came
        (line,) = lines
        assert line["via"] == via and line["status"] == 200 and line["route"].endswith("/predict")
        assert line["model"] and line["bytes_in"] == len(_png(1)) and line["reason"] is None
        assert TOKEN not in json.dumps(line) and "explain" not in line["route"]
    refused_id = f"access-test-refused-{time.time_ns()}"
    requests.post(f"{direct}/predict", data=b"", headers={"x-request-id": refused_id, "authorization": "Bearer x"},
                  timeout=30)
    (line,) = _logged(refused_id)
    assert line["status"] == 401 and line["reason"] == "auth_invalid" and "Bearer" not in json.dumps(line)


@pytest.mark.integration
def test_no_response_names_where_the_model_is_stored(served, tiny_export) -> None:
    """``model_id`` and every other field are the model's name, version and digest, never its storage location."""
    import requests

    direct, proxy = served
    folder = str(Path(tiny_export[0]).resolve())
    auth = {"authorization": f"Bearer {TOKEN}"}
    model = requests.get(f"{direct}/", headers=auth, timeout=30).json()["open_inference_protocol"].rsplit("/", 1)[1]
    for url in (direct, proxy):
        responses = [requests.post(f"{url}/predict", data=_png(2), headers={**auth, "content-type": "image/png"},
                                   timeout=60)]
        responses += [requests.get(f"{url}{path}", headers=auth, timeout=30)
                      for path in ("/healthz", "/v2", f"/v2/models/{model}", f"/v2/models/{model}/ready", "/")]
        for resp in responses:
            assert resp.status_code == 200, (resp.url, resp.text)
            seen = resp.text + json.dumps(dict(resp.headers))
            assert folder not in seen and str(Path(folder).parent) not in seen, (resp.url, seen[:300])
