"""Rolling out a new model over a running app drops no request (issue 27, item 4).

Export A is deployed as the app ``kdray`` (:func:`serve.deploy.deploy`, one replica); a bounded closed-loop load
runs against it (``CLIENTS`` threads, each one ``requests.Session`` posting a 256x256 grayscale PNG, one request
at a time, ``PAUSE_S`` apart), and while it runs the other export (different weights: another model digest) is
deployed over it in place: ``serve.run`` of :func:`serve.app.build_app` under the same name and route prefix, as
``serve deploy`` of a changed config does. The load goes on until the new model has answered for
``B_ANSWERS_FOR_S`` seconds.

What Serve does (Ray 2.60, ``ray.serve._private.deployment_state``): a new ``model_dir`` changes the
deployment's version, so each old replica is replaced. With ``max_surge_percent`` 0 (Serve's default) the old
replica is stopped first and its replacement starts beside it as it drains: with one replica, the app has no
running replica until the new one has loaded its model, and requests wait in Serve's router (or HAProxy) for
those seconds; none is refused. With ``max_surge_percent`` 100 the new replica starts first and the old one is
stopped only once the new one runs: no wait. Either way a stopping replica leaves the routing table at once and
then drains: it keeps answering what it already took (and, with direct ingress, its own port stays open for
``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S``, 30 s by default, 1 s in these tests: ``conftest.py``),
then waits for its ongoing requests (``graceful_shutdown_wait_loop_s``, within ``graceful_shutdown_timeout_s``,
which Serve raises to the draining period + 5 s for an ingress deployment), then exits.

Two ingresses: the integration test runs on the shared Ray, which keeps Serve's Python proxy (``conftest.py``:
``RAY_SERVE_ENABLE_HA_PROXY=0``); the e2e test starts its own Ray with kdray's default, HAProxy in front of the
replicas' own ports (:mod:`kdray.ingress`). A stopping replica behind HAProxy closes its listener once the draining
period is over, and HAProxy retries a refused connection on another replica. Each change of the replicas also
reloads HAProxy, whose old process closes the kept-alive client connections: a request sent on one as it closes
is closed unanswered, and the HAProxy test's clients send such a request once more (counted; see that test).

Asserted, for Serve's HTTP address (its proxy, or HAProxy): every request answered 200
(no connection error, no 5xx, no 503: a 503 with Retry-After would count as not answered here; nothing is
retried, but for the HAProxy test's one resend of a request whose connection closed unanswered), the model ids
seen are exactly {old, new}, and no request sent more than ``GRACE_S`` after the first new answer is answered
by the old model. A client that kept one replica's own address (what :func:`serve.deploy.deploy` returns with
direct ingress and one replica, on a node without HAProxy) is measured beside it: it is pinned to the old
replica, never sees the new model, and has its connections refused once that replica has drained; the test
asserts the first and prints the second.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

CLIENTS = 4
PAUSE_S = 0.005  # between one client's requests: the load stays bounded on the 2-core box
BEFORE_S = 2.0  # load on the old model before the rollout starts
B_ANSWERS_FOR_S = 3.0  # load goes on this long after the first answer of the new model
GRACE_S = 2.0  # a request sent this long after the first new answer must not be answered by the old model
ROLLOUT_DEADLINE_S = 90.0
REQUEST_TIMEOUT_S = 60.0
HEADER = "x-kdray-model"  # when the app sets it (another change): it must name the model that answered


def _xray_png(size: int = 256) -> bytes:
    """A real-looking grayscale chest X-ray PNG (the demo data's generator, at serving size)."""
    from PIL import Image

    from cluster.local.demo_data import make_image

    buf = io.BytesIO()
    Image.fromarray(make_image("normal", size, np.random.default_rng(27)), "L").save(buf, format="PNG")
    return buf.getvalue()


def _digest(model_id: str) -> str:
    """``<12 hex>`` of ``name:version@sha256:<12 hex>#variant``."""
    return model_id.split("@sha256:", 1)[1].split("#", 1)[0]


@dataclasses.dataclass(frozen=True)
class Answer:
    sent: float
    received: float
    outcome: int | str  # the HTTP status, or the exception's name (ConnectionError, ReadTimeout, ...)
    model_id: str = ""
    header: str | None = None
    detail: str = ""  # the exception's message, or a refusal's body
    retried: bool = False  # sent again once after its connection was closed before any response


#: What a client sees when a kept-alive connection is closed as it sends on it: nothing was answered, so an
#: idempotent request may be sent again (RFC 9112, 9.3.1); POST /predict changes nothing. requests (urllib3)
#: does not resend a POST by itself.
CLOSED_UNANSWERED = ("RemoteDisconnected", "Connection reset by peer")


class Load:
    """``clients`` threads, each posting ``data`` to ``url``/predict one request at a time until stopped.

    ``resend_closed``: a request whose connection was closed before any response (:data:`CLOSED_UNANSWERED`) is
    sent once more, as a client following RFC 9112 may, and counted as ``retried``."""

    def __init__(self, url: str, data: bytes, clients: int, resend_closed: bool = False):
        self.url, self.data, self.resend_closed = url, data, resend_closed
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)

    def _client(self) -> None:
        import requests

        with requests.Session() as session:
            while not self._stop.is_set():
                sent = time.monotonic()
                answer = self._post(session, sent)
                if self.resend_closed and answer.outcome == "ConnectionError" and any(
                        s in answer.detail for s in CLOSED_UNANSWERED):
                    answer = dataclasses.replace(self._post(session, sent), retried=True)
                with self._lock:
                    self.answers.append(answer)
                time.sleep(PAUSE_S if answer.outcome == 200 else 0.05)

    def _post(self, session, sent: float) -> Answer:
        try:
            resp = session.post(f"{self.url}/predict", data=self.data, headers={"content-type": "image/png"},
                                timeout=REQUEST_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - what the client saw is the measurement
            return Answer(sent, time.monotonic(), type(exc).__name__, detail=str(exc)[:300])
        ok = resp.status_code == 200
        return Answer(sent, time.monotonic(), resp.status_code, resp.json().get("model_id", "") if ok else "",
                      resp.headers.get(HEADER), "" if ok else resp.text[:200])

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)


def _export(root: Path, seed: int) -> str:
    """An untrained tiny 32-px student exported as jobs.export does (as conftest's ``tiny_export``)."""
    from cluster.local.demo_data import CLASSES, make_image
    from conftest import make_checkpoint
    from kdray.export import export_student

    checkpoint = make_checkpoint(root / "checkpoint", "tiny_student", image_size=32, seed=seed)
    rng = np.random.default_rng(0)
    labels = np.arange(30) % len(CLASSES)
    images = np.stack([make_image(CLASSES[y], 32, rng) for y in labels])
    export_student(checkpoint, str(root / "export"), images, images, labels, strict=False)
    return str(root / "export")


@pytest.fixture(scope="module")
def exports(tiny_export, tmp_path_factory) -> dict[str, str]:
    """Two exports of different weights (seed 0: conftest's, seed 1: here): their model digests differ."""
    return {"A": tiny_export[0], "B": _export(tmp_path_factory.mktemp("rollout-b"), seed=1)}


@dataclasses.dataclass
class Served:
    serve_url: str  # Serve's HTTP address: its proxy, or HAProxy
    deploy_url: str  # what deploy() returned
    model_ids: dict[str, str]  # export name → model_id
    current: str = "A"


def _deploy_a(exports: dict[str, str]) -> Served:
    """Export A as the app ``kdray`` (one replica of 0.5 CPU), through :func:`serve.deploy.deploy`."""
    import requests

    from kdray import ray_private
    from kdray.raycluster import free_loopback_port
    from serve.app import APP_NAME
    from serve.deploy import deploy

    deploy_url = deploy(exports["A"], port=free_loopback_port(), num_replicas=1, num_cpus=0.5, name=APP_NAME)
    host, port = ray_private.serve_http_address()
    serve_url = f"http://{host}:{port}"
    model_a = requests.post(f"{serve_url}/predict", data=_xray_png(), headers={"content-type": "image/png"},
                            timeout=REQUEST_TIMEOUT_S).json()["model_id"]
    return Served(serve_url, deploy_url, {"A": model_a, "B": ""})


@pytest.fixture(scope="module")
def served(exports, ray_local) -> Iterator[Served]:
    """Export A on the run's shared Ray (Serve's Python proxy)."""
    from ray import serve

    try:
        yield _deploy_a(exports)
    finally:
        serve.shutdown()


def _replica_url(app: str, proxy_port: int) -> str | None:
    """The one replica's own HTTP address (direct ingress), or None."""
    from serve.deploy import replica_urls

    urls = replica_urls(app, proxy_port, wait_s=0)
    return urls[0] if len(urls) == 1 else None


def _roll_out(served: Served, exports: dict[str, str], label: str, resend_closed: bool = False, **options) -> None:
    """Deploy the export not being served over the running app under load; assert; print the counts."""
    from ray import serve

    from serve.app import ACCESS_LOG_OFF, APP_NAME, build_app

    old, new = served.current, "B" if served.current == "A" else "A"
    proxy_port = int(served.serve_url.rsplit(":", 1)[1])
    pinned_url = _replica_url(APP_NAME, proxy_port)
    data = _xray_png()
    app = build_app(exports[new], num_cpus=0.5, num_replicas=1, autoscaling_config=None, **options)
    with (Load(served.serve_url, data, CLIENTS, resend_closed) as load,
          Load(pinned_url or served.serve_url, data, 1, resend_closed) as pinned):
        time.sleep(BEFORE_S)
        started = time.monotonic()
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=ACCESS_LOG_OFF)
        ran_s = time.monotonic() - started
        first_new = None
        while time.monotonic() - started < ROLLOUT_DEADLINE_S:
            answers = load.snapshot()
            ids = {a.model_id for a in answers} - {served.model_ids[old], ""}
            if ids and first_new is None:
                served.model_ids[new] = next(iter(ids))
                first_new = min(a.received for a in answers if a.model_id == served.model_ids[new])
            if first_new is not None and time.monotonic() - first_new >= B_ANSWERS_FOR_S:
                break
            time.sleep(0.2)
    served.current = new
    answers = sorted(load.answers, key=lambda a: a.sent)
    old_id, new_id = served.model_ids[old], served.model_ids[new]

    counts = Counter(a.model_id for a in answers if a.outcome == 200)
    failures = Counter(a.outcome for a in answers if a.outcome != 200)
    retried = sum(a.retried for a in answers)
    wait = max(a.received - a.sent for a in answers)
    late_old = [a for a in answers if first_new is not None and a.sent > first_new + GRACE_S and a.model_id == old_id]
    pinned_seen = Counter(a.model_id if a.outcome == 200 else a.outcome for a in pinned.answers)
    print(f"\nrollout ({label}) via {served.serve_url}: {old}={_digest(old_id)} n={counts[old_id]}, "
          f"{new}={_digest(new_id) if new_id else '-'} n={counts[new_id] if new_id else 0}; non-200: "
          f"{dict(failures) or 0}; resent after a closed connection: {retried}; longest wait {wait:.2f} s; "
          f"serve.run returned after {ran_s:.1f} s")
    print(f"  {'pinned replica' if pinned_url else 'deploy() URL (Serve address)'} "
          f"{pinned_url or served.serve_url}: "
          + ", ".join(f"{_digest(k) if isinstance(k, str) and '@' in k else k} n={n}" for k, n in pinned_seen.items())
          + (f"; deploy() returned {served.deploy_url}" if label.startswith("defaults") else ""))

    assert first_new is not None, f"the new model never answered within {ROLLOUT_DEADLINE_S:.0f} s"
    failed = [f"sent {a.sent - started:+.2f} s after serve.run, {a.received - a.sent:.2f} s: {a.outcome} {a.detail}"
              for a in answers if a.outcome != 200]
    assert not failures, f"not every request was answered: {dict(failures)} of {len(answers)}: {failed[:5]}"
    assert set(counts) == {old_id, new_id}, counts
    assert _digest(old_id) != _digest(new_id)
    assert retried <= 2 * CLIENTS, f"{retried} requests met a closed connection"  # one per client and reload
    assert not late_old, (f"{len(late_old)} request(s) sent over {GRACE_S} s after the first new answer were "
                          f"answered by the old model")
    mislabelled = [a for a in answers if a.header is not None and a.header != a.model_id]
    assert not mislabelled, f"{HEADER} differs from model_id: {mislabelled[:3]}"
    if pinned_url:  # the replica's own port belongs to the old replica: it never answers with the new model
        assert new_id not in pinned_seen, pinned_seen
        assert all(k in (old_id, "ConnectionError") for k in pinned_seen), pinned_seen


@pytest.mark.integration
def test_rollout_with_serves_defaults_answers_every_request(served, exports) -> None:
    """max_surge_percent 0 (Serve's default, serve/options.py sets none): the old replica stops first."""
    _roll_out(served, exports, "defaults, Serve's proxy")


@pytest.mark.integration
def test_rollout_with_surge_answers_every_request(served, exports) -> None:
    """max_surge_percent 100: the new replica runs before the old one stops (no wait for a replica)."""
    _roll_out(served, exports, "max_surge_percent=100, Serve's proxy", max_surge_percent=100)


@pytest.mark.e2e
def test_rollout_through_haproxy_answers_every_request(exports, monkeypatch) -> None:
    """kdray's default ingress (HAProxy, its own Ray), Serve's default rollout.

    Serve reloads HAProxy when the replicas change; the old HAProxy process closes its kept-alive client
    connections, and a client that sends on one at that moment sees it closed with no response (measured: one
    request in about one rollout of three). Nothing was answered, so the client here sends it once more (as RFC
    9112 allows for an idempotent request); such resends are counted, printed and bounded."""
    import ray
    from ray import serve

    from kdray import ingress
    from kdray.raycluster import init_ray

    monkeypatch.setenv(ingress.HAPROXY_ENV, "1")  # the shared Ray's fixture turned it off for this process
    init_ray()
    try:
        served = _deploy_a(exports)
        assert served.deploy_url == served.serve_url  # deploy() returns HAProxy's address
        _roll_out(served, exports, "defaults, HAProxy", resend_closed=True)
    finally:
        serve.shutdown()
        ray.shutdown()
