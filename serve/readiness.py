"""Readiness of a replica: one tiny inference through the serving path, at most one at a time, its outcome kept.

Liveness (``/v2/health/live``) does no model work; readiness (``/v2/health/ready``, ``/v2/models/{model}/ready``)
and Serve's replica health check (``check_health``) ask :class:`Readiness`, which runs the probe (a
:meth:`serve.handler.StudentHandler.probe`) and answers None (ready) or a reason code:

* ``not_ready``: the probe raised (the model cannot answer);
* ``ready_timeout``: it did not finish within the timeout (the probe goes on: the next check waits for the
  same one).

At most one probe runs at a time: every check that arrives meanwhile awaits the same one. Its outcome is kept
``cache_s``, so a flood of probes costs at most one inference per ``cache_s``. No Ray, no HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

NOT_READY, TIMEOUT = "not_ready", "ready_timeout"


class Readiness:
    def __init__(self, probe: Callable[[], Awaitable[None]], timeout_s: float, cache_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.probe, self.timeout_s, self.cache_s, self.clock = probe, float(timeout_s), float(cache_s), clock
        self.probes = 0  # probe inferences started
        self._kept: tuple[float, str | None] | None = None  # (until, outcome)
        self._running: asyncio.Future | None = None

    async def check(self, bounded: bool = True) -> str | None:
        """None when the replica is ready, else the reason code. ``bounded=False`` waits as long as the probe
        takes (Serve's health check, which has a timeout of its own)."""
        if self._kept is not None and self.clock() < self._kept[0]:
            return self._kept[1]
        if self._running is None:
            self.probes += 1
            self._running = asyncio.ensure_future(self._run())
        try:
            return await asyncio.wait_for(asyncio.shield(self._running), self.timeout_s if bounded else None)
        except asyncio.TimeoutError:
            return TIMEOUT

    async def _run(self) -> str | None:
        try:
            await self.probe()
            outcome = None
        except Exception as exc:  # noqa: BLE001 - any failure of the model is "not ready"
            log.warning("readiness probe failed: %s: %s", type(exc).__name__, str(exc)[:200])
            outcome = NOT_READY
        self._kept, self._running = (self.clock() + self.cache_s, outcome), None
        return outcome
