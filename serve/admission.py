"""ASGI middleware: admit at most ``limit`` inference requests at once; answer the excess 503 + Retry-After.

A rejected request is held ``hold_s`` (an asyncio sleep: no CPU) before its 503 is sent. A client that
ignores Retry-After and retries at once (hey, a naive retry loop) then sends at most ``1 / hold_s`` requests
a second instead of thousands, and rejecting it stays cheap; answered in ``hold_s`` plus a few
milliseconds, the 503 is still fast. Health and metadata routes are never held back.
"""

from __future__ import annotations

import asyncio
import math

from serve.refusal import send_refusal

OVERLOADED = 503


class Admission:
    def __init__(self, app, limit: int, hold_s: float, retry_after_s: float, prefixes: tuple[str, ...]):
        self.app, self.limit, self.hold_s, self.prefixes = app, int(limit), float(hold_s), tuple(prefixes)
        self.retry_after = str(max(1, math.ceil(retry_after_s)))
        self.in_flight = 0
        self.rejected = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not _under(scope, self.prefixes):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            self.rejected += 1
            await asyncio.sleep(self.hold_s)
            return await self._refuse(send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(self, send) -> None:
        message = f"overloaded: {self.limit} requests are in progress; retry after {self.retry_after} s"
        await send_refusal(send, OVERLOADED, "overloaded", message, ((b"retry-after", self.retry_after.encode()),))


def _under(scope, prefixes: tuple[str, ...]) -> bool:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    relative = path[len(root):] if root and path.startswith(root) else path
    return relative.startswith(prefixes) or path.startswith(prefixes)
