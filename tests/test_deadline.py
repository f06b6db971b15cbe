"""serve/deadline.py: the body arrives within a deadline before an admission slot is taken; answers have one too.

The slow-upload test runs uvicorn on 127.0.0.1 over both guard stacks a replica has: the front one that Serve
builds from serve.admission.replica_middlewares, and the FastAPI app's own, each over a stand-in route."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


SLOW_UPLOADS, LEGITIMATE, ANNOUNCED = 80, 10, 30 * 2**20
BODY_TIMEOUT_S = 4  # shorter than the default, so that the test sees the slow uploads cut off


async def _echo(scope, receive, send):
    """A stand-in route: reads the whole body, answers 200 with its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


def _call(app, messages: list, scope: dict | None = None):
    """Runs ``app`` on one request whose receive yields ``messages`` (then waits forever); the sent messages."""
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/predict", "headers": [], **(scope or {})},
                    receive, send))
    return sent


@pytest.mark.unit
def test_the_body_is_read_whole_and_handed_on() -> None:
    from serve.deadline import BodyDeadline

    chunks = [{"type": "http.request", "body": b"x" * 10, "more_body": True},
              {"type": "http.request", "body": b"y" * 5, "more_body": False}]
    sent = _call(BodyDeadline(_echo, timeout_s=5, max_receiving_bytes=100, retry_after_s=1), chunks)
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"15"


@pytest.mark.unit
def test_a_body_that_does_not_arrive_in_time_gets_408_and_closes_before_the_app_runs() -> None:
    from serve.deadline import BodyDeadline

    async def app(scope, receive, send):
        raise AssertionError("the app must not see a request whose body never arrived")

    gate = BodyDeadline(app, timeout_s=0.2, max_receiving_bytes=100, retry_after_s=1)
    sent = _call(gate, [{"type": "http.request", "body": b"x", "more_body": True}])
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 408 and headers[b"connection"] == b"close"
    assert json.loads(sent[1]["body"])["reason"] == "body_timeout" and gate.timed_out == 1


@pytest.mark.unit
def test_bodies_still_arriving_hold_a_bounded_number_of_bytes() -> None:
    """Uploads that never finish cannot fill memory before their deadline: past the bound, 503 + Retry-After."""
    from serve.deadline import BodyDeadline

    gate = BodyDeadline(_echo, timeout_s=5, max_receiving_bytes=100, retry_after_s=2)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}

    def client(messages: list, finish: asyncio.Event | None = None):
        """(receive, send, sent) of a client that sends ``messages``, then the end of its body when ``finish``."""
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await finish.wait()
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        return receive, send, sent

    async def scenario():
        finish = asyncio.Event()
        receive, send, stalled = client([{"type": "http.request", "body": b"x" * 80, "more_body": True}], finish)
        first = asyncio.create_task(gate(scope, receive, send))
        await asyncio.sleep(0.05)
        assert gate.receiving == 80
        receive, send, sent = client([{"type": "http.request", "body": b"y" * 30, "more_body": False}])
        await gate(scope, receive, send)
        headers = dict(sent[0]["headers"])
        assert sent[0]["status"] == 503 and headers[b"retry-after"] == b"2" and headers[b"connection"] == b"close"
        assert json.loads(sent[1]["body"])["reason"] == "busy_receiving" and gate.refused == 1
        finish.set()
        await first
        assert stalled[0]["status"] == 200 and stalled[1]["body"] == b"80"
        assert gate.receiving == 0  # what arrived is no longer counted once handed on

    asyncio.run(scenario())


@pytest.mark.unit
def test_a_request_that_takes_too_long_gets_503_with_retry_after() -> None:
    from serve.deadline import RequestTimeout

    async def stuck(scope, receive, send):
        await asyncio.sleep(60)

    timeout = RequestTimeout(stuck, timeout_s=0.2, retry_after_s=1)
    sent = _call(timeout, [])
    assert sent[0]["status"] == 503 and dict(sent[0]["headers"])[b"retry-after"] == b"1"
    assert json.loads(sent[1]["body"])["reason"] == "request_timeout" and timeout.timed_out == 1

    async def slow_body(scope, receive, send):  # started in time: the rest of the response is not cut off
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.4)
        await send({"type": "http.response.body", "body": b"late but whole"})

    sent = _call(RequestTimeout(slow_body, timeout_s=0.2, retry_after_s=1), [])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"late but whole"


# -- over real sockets: 80 slow uploads must not keep 10 legitimate requests from being answered

def _shorter_deadline(middlewares: list) -> list:
    """The same middlewares, in the same order, with the body deadline at BODY_TIMEOUT_S (matched by name, so
    that this test also runs, and fails, on a tree without one)."""
    from starlette.middleware import Middleware

    return [Middleware(m.cls, *m.args, **{**m.kwargs, "timeout_s": BODY_TIMEOUT_S})
            if m.cls.__name__ == "BodyDeadline" else m for m in middlewares]


def _front_stack():
    """What a replica's direct-ingress server runs in front of Serve: Serve applies the callback's list."""
    from ray.serve._private.http_util import _apply_middlewares

    from serve.admission import replica_middlewares

    return _apply_middlewares(_echo, _shorter_deadline(replica_middlewares()))


def _app_stack():
    """The FastAPI app's own middleware stack over a stand-in route."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from serve.app import fastapi_app

    async def predict(request: Request):
        return PlainTextResponse(str(len(await request.body())))

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])],
                     middleware=_shorter_deadline(fastapi_app.user_middleware))


class Server:
    """uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="off",
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _request(port: int, body: bytes = b"", timeout: float = 10.0) -> int:
    """One POST /predict with a small body: the status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        return _status(conn)


def _status(conn: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = conn.recv(4096)
        if not chunk:
            return 0
        head += chunk
    return int(head.split(b" ", 2)[1])


@pytest.mark.integration  # no services, but its deadlines take seconds: kept out of the one-minute unit tier
@pytest.mark.parametrize("stack", [_front_stack, _app_stack], ids=["front", "app"])
def test_slow_uploads_hold_no_slot_and_are_cut_off_at_the_deadline(stack, monkeypatch) -> None:
    monkeypatch.delenv("KDRAY_ADMISSION_LIMIT", raising=False)  # the default limit (64): fewer than the uploads
    app = stack()
    with Server(app) as server:
        slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(SLOW_UPLOADS)]
        stop = threading.Event()

        def trickle():  # one byte a second on each, as long as the server reads
            while not stop.is_set():
                for conn in slow:
                    try:
                        conn.send(b"x")
                    except OSError:
                        pass
                stop.wait(1)

        try:
            for conn in slow:
                conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                             b"Content-Length: %d\r\n\r\n" % ANNOUNCED)
            trickler = threading.Thread(target=trickle, daemon=True)
            trickler.start()
            time.sleep(1)  # every upload has started (and, on the old code, taken its slot)
            started = time.monotonic()
            with ThreadPoolExecutor(LEGITIMATE) as pool:
                statuses = list(pool.map(lambda i: _request(server.port, b"\x89PNG" + bytes([i]) * 100),
                                         range(LEGITIMATE)))
            took = time.monotonic() - started
            assert statuses == [200] * LEGITIMATE and took < 10, (statuses, took)
            # the slow uploads: each answered 408 at its deadline (BODY_TIMEOUT_S after it started), then closed
            slow_statuses = []
            for conn in slow:
                conn.settimeout(2 * BODY_TIMEOUT_S)
                slow_statuses.append(_status(conn))
            assert slow_statuses == [408] * SLOW_UPLOADS
            assert all(_closed(conn) for conn in slow)
        finally:
            stop.set()
            for conn in slow:
                conn.close()


def _closed(conn: socket.socket) -> bool:
    """Reads what is left of the response: True when the server then closes the connection."""
    conn.settimeout(5)
    try:
        while conn.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except OSError:  # still open after 5 s
        return False
    return True
