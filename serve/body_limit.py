"""ASGI middleware: refuse request bodies over a byte limit before reading them.

* With ``Content-Length``: checked from the header, before a byte of the body is read (413 at once).
* Without it (``Transfer-Encoding: chunked``): the body is counted as it streams, and the request is
  answered 413 as soon as the count passes the limit; the app never sees more than the limit.
"""

from __future__ import annotations

from serve.refusal import send_refusal

TOO_LARGE = 413


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send, f"the request body is {declared} bytes; at most {self.max_bytes} "
                                            "are accepted")
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(send, f"the request body is over the {self.max_bytes}-byte limit")

    async def _refuse(self, send, message: str) -> None:
        await send_refusal(send, TOO_LARGE, "body_too_large", message, ((b"connection", b"close"),))


def _content_length(scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
