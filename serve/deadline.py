"""ASGI middlewares: deadlines on receiving a request's body and on answering it.

* :class:`BodyDeadline` receives the whole body within ``timeout_s`` and only then calls the app, handing it the
  body already read. It sits in front of the admission gate (serve/admission.py), so a slow upload waits
  without an admission slot, and one slower than the deadline gets 408 (reason ``body_timeout``) and its
  connection closed. Waiting costs it an idle coroutine and the bytes received so far (under the body limit,
  which sits in front of it); the bodies being received together may hold at most ``max_receiving_bytes``,
  past which the next chunk's request gets 503 + Retry-After (reason ``busy_receiving``), so that uploads
  that never finish cannot fill the replica's memory before their deadline.
* :class:`RequestTimeout` gives a request ``timeout_s`` from its admission to the start of its response;
  past that it is cancelled (its decodes not yet started are dropped, its slot freed) and answered
  503 + Retry-After (reason ``request_timeout``): the replica is too busy to answer in time, as with the
  admission gate's 503, so a client retries the same way.
"""

from __future__ import annotations

import asyncio

from serve.refusal import retry_after, send_refusal

BODY_TIMEOUT = 408
BUSY = REQUEST_TIMEOUT = 503
CLOSE = (b"connection", b"close")  # the rest of the body is not read


class BodyDeadline:
    def __init__(self, app, timeout_s: float, max_receiving_bytes: int, retry_after_s: float):
        self.app, self.timeout_s, self.max_receiving_bytes = app, float(timeout_s), int(max_receiving_bytes)
        self.busy_headers = (CLOSE, retry_after(retry_after_s))
        self.receiving = 0  # bytes of the bodies still arriving
        self.timed_out = self.refused = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # nobody to answer
                    chunk = message.get("body", b"")
                    if self.receiving + len(chunk) > self.max_receiving_bytes:
                        self.refused += 1
                        return await send_refusal(send, BUSY, "busy_receiving",
                                                  "too many request bodies are arriving at once; retry later",
                                                  self.busy_headers)
                    chunks.append(chunk)
                    size += len(chunk)
                    self.receiving += len(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            self.timed_out += 1
            return await send_refusal(send, BODY_TIMEOUT, "body_timeout",
                                      f"the request body did not arrive within {self.timeout_s:g} s", (CLOSE,))
        finally:
            self.receiving -= size
        body = b"".join(chunks)
        del chunks
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class RequestTimeout:
    def __init__(self, app, timeout_s: float, retry_after_s: float):
        self.app, self.timeout_s = app, float(timeout_s)
        self.headers = (retry_after(retry_after_s),)
        self.timed_out = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        try:
            async with asyncio.timeout(self.timeout_s) as deadline:

                async def starting_send(message):
                    nonlocal started
                    if message["type"] == "http.response.start":
                        started = True
                        deadline.reschedule(None)  # answering: the rest of the response is not cut off
                    await send(message)

                await self.app(scope, receive, starting_send)
        except TimeoutError:
            if started or not deadline.expired():
                raise
            self.timed_out += 1
            await send_refusal(send, REQUEST_TIMEOUT, "request_timeout",
                               f"no answer within {self.timeout_s:g} s: the server is too busy; retry later",
                               self.headers)
