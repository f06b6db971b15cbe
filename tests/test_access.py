"""serve/access.py and serve/auth.py: bearer tokens, Origin and Host allow-lists, request ids, one access-log
line per request.

The ASGI middleware, driven directly (unit); the live deployment is tests/test_access_http.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdray import KdrayError
from serve import access
from serve.access import MARK, MARK_HEADER, Access, env_of, options_from_env, request_id
from serve.auth import Guard, host_name, load_tokens
from serve.options import ACCESS
from serve.refusal import send_refusal

TOKENS = ("first-token-0123456789", "second-token-0123456789")


@pytest.fixture
def tokens_file(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text(f"# kdray clients\n{TOKENS[0]}\n\n{TOKENS[1]}\n")
    return str(path)


@pytest.fixture
def access_lines() -> Iterator[list[dict]]:
    """The JSON lines the ``kdray.access`` logger writes during the test."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(record.getMessage()))

    logger = logging.getLogger("kdray.access")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _app(calls: list, status: int = 200, body: bytes = b'{"ok": true}', refuse: str | None = None):
    """An inner ASGI app that records what reached it (headers included) and answers, or refuses with a reason."""
    async def app(scope, receive, send):
        calls.append(dict(scope["headers"]))
        message = await receive()
        calls[-1]["body"] = message.get("body", b"")
        if refuse:
            return await send_refusal(send, 413, refuse, "too big")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"serve-set")]})
        await send({"type": "http.response.body", "body": body})
    return app


def _call(app, path: str = "/predict", method: str = "POST", headers: dict | None = None, body: bytes = b"img",
          query: bytes = b""):
    """(status, headers as a list of pairs, body) of one request through ``app``."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": query,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[0]["headers"], b"".join(m.get("body", b"") for m in sent[1:])


def _header(headers, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


# -- authentication

@pytest.mark.unit
def test_without_tokens_everything_passes_and_no_cors_header_is_sent() -> None:
    calls = []
    status, headers, _ = _call(Access(_app(calls), options=ACCESS))
    assert status == 200 and len(calls) == 1
    assert not [k for k, _ in headers if k.startswith(b"access-control-")]


@pytest.mark.unit
@pytest.mark.parametrize("layer", ["front", "app"])
def test_with_tokens_every_route_but_liveness_needs_one(tokens_file: str, layer: str) -> None:
    calls = []
    gate = Access(_app(calls), layer, dataclasses.replace(ACCESS, tokens_file=tokens_file))
    for path, method in (("/predict", "POST"), ("/v2/models/kdray-student/infer", "POST"), ("/healthz", "GET"),
                         ("/v2", "GET"), ("/v2/models/kdray-student", "GET"), ("/docs", "GET"), ("/", "GET")):
        status, headers, body = _call(gate, path, method)
        assert status == 401 and json.loads(body)["reason"] == "auth_required", (path, body)
        assert _header(headers, b"www-authenticate")[0].startswith(b"Bearer")
        status, headers, body = _call(gate, path, method, {"authorization": "Bearer wrong-token-0123456789"})
        assert status == 401 and json.loads(body)["reason"] == "auth_invalid"
        assert b'error="invalid_token"' in _header(headers, b"www-authenticate")[0]
    assert calls == []  # no refused request reached the app
    for token in TOKENS:
        assert _call(gate, headers={"authorization": f"Bearer {token}"})[0] == 200
    assert _call(gate, "/kdray/predict", headers={"authorization": f"bearer {TOKENS[1]}"})[0] == 200
    assert _call(gate, "/v2/health/live", "GET")[0] == 200  # liveness: kubelet probes carry no token
    assert _call(gate, "/v2/health/ready", "GET")[0] == 200  # readiness: nor do readiness probes
    assert _call(gate, "/v2/models/kdray-student/ready", "GET")[0] == 401  # the model's own: as other routes
    assert _call(gate, "/app/v2/health/live", "GET")[0] == 200  # in front of Serve: the route prefix
    assert _call(gate, "/-/healthz", "GET")[0] == 200  # Serve's own, on a replica's port (HAProxy checks it)


@pytest.mark.unit
@pytest.mark.parametrize("layer", ["front", "app"])
def test_the_viewers_files_need_no_token_and_open_nothing_else(tokens_file: str, layer: str) -> None:
    """The page holds no data (its token field serves the API calls), so a browser loads it without a token; the
    JSON index at the same path, every other route and every look-alike path still need one, and the Host
    allow-list still applies to the page."""
    calls = []
    options = dataclasses.replace(ACCESS, tokens_file=tokens_file, allowed_hosts=("xray.example",))
    gate = Access(_app(calls), layer, options)
    browser = {"accept": "text/html,application/xhtml+xml", "host": "xray.example"}
    for path in ("/", "/viewer.js", "/viewer.css"):
        assert _call(gate, path, "GET", browser)[0] == 200, path
    assert len(calls) == 3
    for path in ("/predict", "/model", "/healthz", "/docs", "/viewer.jsx", "/x/viewer.js", "//", "/index.html"):
        assert _call(gate, path, "GET", browser)[0] == 401, path
    assert _call(gate, "/predict", "POST", browser)[0] == 401
    assert _call(gate, "/", "GET", {"accept": "*/*", "host": "xray.example"})[0] == 401  # the JSON index
    assert _call(gate, "/", "GET", {**browser, "host": "rebound.example"})[0] == 421
    assert len(calls) == 3


@pytest.mark.unit
def test_every_token_is_compared_in_constant_time(tokens_file: str, monkeypatch) -> None:
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(a) or real(a, b))
    guard = Guard(dataclasses.replace(ACCESS, tokens_file=tokens_file))
    assert guard.check("/predict", {b"authorization": f"Bearer {TOKENS[0]}".encode()}) is None
    assert compared == [t.encode() for t in TOKENS]  # the first matched; the second was compared all the same


@pytest.mark.unit
def test_a_tokens_file_that_cannot_be_used_is_an_error_that_shows_no_token(tmp_path: Path) -> None:
    with pytest.raises(KdrayError, match="cannot be read"):
        load_tokens(str(tmp_path / "missing"), 16)
    (tmp_path / "empty").write_text("# none yet\n\n")
    with pytest.raises(KdrayError, match="no token"):
        load_tokens(str(tmp_path / "empty"), 16)
    (tmp_path / "short").write_text("secret-but-short\nabc\n")
    with pytest.raises(KdrayError, match="at least 16") as error:
        load_tokens(str(tmp_path / "short"), 16)
    assert "abc" not in str(error.value) and "secret" not in str(error.value)


# -- exposure: Origin and Host

@pytest.mark.unit
def test_a_cross_origin_request_is_refused_unless_its_origin_is_allowed() -> None:
    calls = []
    gate = Access(_app(calls), options=ACCESS)
    status, headers, body = _call(gate, headers={"origin": "https://evil.example",
                                                 "content-type": "multipart/form-data"})
    assert status == 403 and json.loads(body)["reason"] == "origin_not_allowed" and calls == []
    assert not [k for k, _ in headers if k.startswith(b"access-control-")]
    allowed = Access(_app(calls), options=dataclasses.replace(ACCESS, allowed_origins=("https://viewer.example",)))
    status, headers, _ = _call(allowed, headers={"origin": "https://viewer.example"})
    assert status == 200 and _header(headers, b"access-control-allow-origin") == [b"https://viewer.example"]
    status, headers, _ = _call(allowed, method="OPTIONS", headers={"origin": "https://viewer.example",
                                                                   "access-control-request-method": "POST"})
    assert status == 204 and b"POST" in _header(headers, b"access-control-allow-methods")[0]
    assert _call(allowed, headers={"origin": "https://evil.example"})[0] == 403


@pytest.mark.unit
@pytest.mark.parametrize("origin, host, allowed_hosts, status", [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", (), 200),          # the server's own /docs page
    ("http://[::1]:8000", "[::1]:8000", (), 200),
    ("http://localhost:8000", "localhost:8000", (), 200),
    ("http://rebound.evil.example:8000", "rebound.evil.example:8000", (), 403),  # DNS rebinding: same-origin
    ("http://127.0.0.1:9999", "127.0.0.1:8000", (), 403),          # another port is another origin
    ("https://kdray.example", "kdray.example", ("kdray.example",), 200),
])
def test_a_page_of_the_server_itself_may_call_it_but_a_rebound_name_may_not(origin, host, allowed_hosts,
                                                                               status) -> None:
    gate = Access(_app([]), options=dataclasses.replace(ACCESS, allowed_hosts=allowed_hosts))
    assert _call(gate, headers={"origin": origin, "host": host})[0] == status


@pytest.mark.unit
def test_a_host_allow_list_refuses_other_host_names() -> None:
    calls = []
    assert _call(Access(_app(calls), options=ACCESS), headers={"host": "rebound.evil.example"})[0] == 200
    gate = Access(_app(calls), options=dataclasses.replace(ACCESS, allowed_hosts=("kdray.example", "127.0.0.1")))
    status, _, body = _call(gate, headers={"host": "rebound.evil.example:8000"})
    assert status == 421 and json.loads(body)["reason"] == "host_not_allowed"
    assert _call(gate, headers={})[0] == 421
    assert _call(gate, headers={"host": "KDRAY.example:443"})[0] == 200
    assert _call(gate, headers={"host": "127.0.0.1:8000"})[0] == 200
    assert host_name(b"[::1]:8000") == b"[::1]" and host_name(b"::1") == b"::1"


# -- request ids and the access log

@pytest.mark.unit
def test_request_ids_are_the_clients_when_sane_else_new() -> None:
    assert request_id(b"abc-123_x.y:z", 64) == b"abc-123_x.y:z"
    for insane in (b"a" * 65, b"a b", b"<script>", b"", None, "é".encode()):
        assert re.fullmatch(rb"[0-9a-f]{32}", request_id(insane, 64)), insane
    calls = []
    for layer in ("front", "app"):
        _, headers, _ = _call(Access(_app(calls), layer, ACCESS), headers={"x-request-id": "client-1"})
        assert calls[-1][b"x-request-id"] == b"client-1"  # the next layer (Serve's own logs) sees the same id
    # the front keeps exactly one on the response, whatever Serve's RequestIdMiddleware added inside it
    _, headers, _ = _call(Access(_app(calls), "front", ACCESS), headers={"x-request-id": "x" * 500})
    (rid,) = _header(headers, b"x-request-id")
    assert re.fullmatch(rb"[0-9a-f]{32}", rid) and calls[-1][b"x-request-id"] == rid


@pytest.mark.unit
def test_one_log_line_per_request_with_its_fields_and_nothing_private(tokens_file: str, access_lines) -> None:
    access.serving("kdray-student:1@sha256:abc")
    calls = []
    options = dataclasses.replace(ACCESS, tokens_file=tokens_file)
    gate = Access(_app(calls, body=b"0123456789"), "front", options)
    _call(gate, headers={"authorization": f"Bearer {TOKENS[0]}", "x-request-id": "r-1"}, body=b"patient-pixels",
          query=b"explain=true&patient=Jane")
    _call(gate, headers={"authorization": "Bearer guessed-token-0123456789"}, query=b"patient=Jane")
    _call(Access(_app(calls, refuse="body_too_large"), "app", ACCESS), "/v2/models/m/infer")
    assert len(access_lines) == 3
    ok, refused, too_large = access_lines
    assert set(ok) == {"id", "method", "route", "status", "latency_ms", "bytes_in", "bytes_out", "reason", "model",
                       "via"}
    assert ok["id"] == "r-1" and ok["method"] == "POST" and ok["route"] == "/predict" and ok["status"] == 200
    assert ok["bytes_in"] == len(b"patient-pixels") and ok["bytes_out"] == 10 and ok["reason"] is None
    assert ok["model"] == "kdray-student:1@sha256:abc" and ok["via"] == "front" and ok["latency_ms"] >= 0
    assert refused["status"] == 401 and refused["reason"] == "auth_invalid" and refused["bytes_in"] == 0
    assert too_large["status"] == 413 and too_large["reason"] == "body_too_large" and too_large["via"] == "app"
    text = json.dumps(access_lines)
    assert "Jane" not in text and "patient" not in text and "token" not in text  # no query, body or token


@pytest.mark.unit
def test_front_then_app_log_once_and_a_forged_mark_is_neither_trusted_nor_passed_on(tokens_file: str,
                                                                                     access_lines) -> None:
    """With direct ingress a request meets the front copy, then the app copy; through Serve's proxy only the app
    copy. Each request is logged (and guarded) exactly once either way."""
    calls = []
    options = dataclasses.replace(ACCESS, tokens_file=tokens_file)
    app_copy = Access(_app(calls), "app", options)
    front = Access(app_copy, "front", options)
    auth = {"authorization": f"Bearer {TOKENS[0]}"}
    assert _call(front, headers=auth)[0] == 200  # direct ingress
    assert _call(app_copy, headers=auth)[0] == 200  # Serve's proxy
    assert [line["via"] for line in access_lines] == ["front", "app"]
    forged = {MARK_HEADER.decode(): "0" * 32}
    assert _call(app_copy, headers=forged)[0] == 401  # a client's mark does not skip the app copy's guard
    assert _call(app_copy, headers={MARK_HEADER.decode(): MARK.decode()})[0] == 200  # only this process's mark
    assert _call(front, headers={**auth, **forged})[0] == 200
    assert calls[-1][MARK_HEADER] == MARK  # the front replaced the client's copy with its own
    assert [line["via"] for line in access_lines] == ["front", "app", "app", "front"]


@pytest.mark.unit
def test_log_off_writes_nothing(access_lines) -> None:
    _call(Access(_app([]), "front", dataclasses.replace(ACCESS, log=False)))
    assert access_lines == []


# -- configuration: the environment every replica reads, app_builder's arguments

@pytest.mark.unit
def test_options_travel_to_every_replica_through_its_environment(tokens_file: str, tmp_path: Path,
                                                                 monkeypatch) -> None:
    options = dataclasses.replace(ACCESS, tokens_file=tokens_file, allowed_origins=("https://a.example",),
                                  allowed_hosts=("kdray.example", "localhost"), log=False)
    assert options_from_env(env_of(options)) == options
    assert options_from_env({}) == ACCESS
    from serve import app as serve_app
    from serve.app import app_builder, deployment_options

    env = deployment_options(access_options=options)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env["KDRAY_AUTH_TOKENS_FILE"] == tokens_file and env["KDRAY_ACCESS_LOG"] == "0"
    assert TOKENS[0] not in json.dumps(env)  # the path travels, never a token
    built = {}
    monkeypatch.setattr(serve_app, "build_app", lambda *args, **kwargs: built.update(kwargs))
    app_builder({"model_dir": str(tmp_path), "auth_tokens_file": tokens_file,
                 "allowed_hosts": "kdray.example, localhost", "access_log": "off"})
    assert built["access_options"] == dataclasses.replace(ACCESS, tokens_file=tokens_file, log=False,
                                                          allowed_hosts=("kdray.example", "localhost"))
    with pytest.raises(KdrayError, match="access_log"):
        app_builder({"model_dir": str(tmp_path), "access_log": "maybe"})


@pytest.mark.unit
def test_a_replica_whose_tokens_file_is_unusable_fails_instead_of_serving_openly(monkeypatch, tmp_path) -> None:
    """The replica reads its settings when it starts (StudentClassifier.__init__): a tokens file named but
    missing is an error there, never authentication off."""
    monkeypatch.setenv("KDRAY_AUTH_TOKENS_FILE", str(tmp_path / "missing"))
    access.process_settings.cache_clear()
    try:
        with pytest.raises(KdrayError, match="cannot be read"):
            access.process_settings()
    finally:
        access.process_settings.cache_clear()


@pytest.mark.unit
def test_the_front_copy_wraps_everything_serve_runs_in_the_replica() -> None:
    """Serve applies the callback's middlewares in list order (the last is the outermost): the front Access must
    be the outermost, so that it logs the other gates' refusals too and guards before any of them works."""
    from ray.serve._private.http_util import _apply_middlewares

    from serve.admission import replica_middlewares

    outermost = _apply_middlewares(_app([]), replica_middlewares())
    assert isinstance(outermost, Access) and outermost.layer == "front"


@pytest.mark.unit
def test_the_rayservice_turns_authentication_on_for_every_ray_container() -> None:
    """Every Ray container of the RayService reads its tokens from a mounted Secret (replicas may run on any)."""
    import yaml

    service = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster/kuberay/rayservice-student.yaml")
                             .read_text())
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                            for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        secrets_by_volume = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            tokens = env.get("KDRAY_AUTH_TOKENS_FILE")
            assert tokens, container["name"]
            mounts = [m for m in container.get("volumeMounts", [])
                      if tokens.startswith(m["mountPath"].rstrip("/") + "/")]
            assert mounts and mounts[0]["name"] in secrets_by_volume and mounts[0].get("readOnly"), container["name"]
