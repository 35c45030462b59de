"""Politeness across invocations: one request in flight per host, and a pause between two.

Scan steps run in many invocations at once, and a site may be scanned by several organizations, so
an in-memory timer is not enough. Each host has one key in Redis that works as a lease:

* a request takes the key (``SET NX PX``) before it is sent; whoever finds it taken waits for as
  long as the key has to live, then tries again;
* the key lives for ``hold_seconds`` while the request runs (longer than a page may take), so a
  worker killed mid-request blocks the host only until then;
* when the request ends, its holder shortens the key to the politeness delay (only if the key is
  still its own), so the next request to that host cannot start before the delay has passed.

If Redis cannot be reached, the crawler falls back to pacing in memory (still one request at a
time within the scan) and logs it once: a scan is not stopped by a cache outage, and a second
scan of the same host at that moment is the only overlap left possible.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from upstash_redis.asyncio import Redis

from shared.logs import DECISION_REASON, log_event

KEY_PREFIX: Final = "scan-host:"
# Retry at least this often while another request holds the host (its delay may be shortened).
MAX_POLL_SECONDS: Final = 0.25

# 0 when taken, and only then; otherwise how many milliseconds to wait before asking again. In the
# key's last millisecond PTTL answers 0 while the key is still there (and -2 once it is gone): both
# become a 1 ms wait, or the asker would take a turn the key never gave it, and whoever asks a moment
# later would find the key gone and take the host too.
_TAKE: Final = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
return math.max(redis.call('pttl', KEYS[1]), 1)
"""

# The holder hands the host on after the politeness delay; a key already taken over is left alone.
_HAND_ON: Final = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""


class HostTurns:
    """Turns at each host for one crawler; ``redis`` None paces in memory only."""

    def __init__(self, redis: Redis | None, *, hold_seconds: float) -> None:
        self.redis = redis
        self.hold_ms = max(1, int(hold_seconds * 1000))
        self._next_local: dict[str, float] = {}
        self._warned = False

    @asynccontextmanager
    async def turn(self, host: str, delay_seconds: float) -> AsyncIterator[None]:
        wait = self._next_local.get(host, 0.0) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        token = await self._take(host)
        try:
            yield
        finally:
            self._next_local[host] = time.monotonic() + delay_seconds
            if token is not None:
                await self._hand_on(host, token, delay_seconds)

    async def _take(self, host: str) -> str | None:
        if self.redis is None:
            return None
        token = secrets.token_hex(8)
        key = KEY_PREFIX + host
        while True:
            try:
                left_ms = int(await self.redis.eval(_TAKE, keys=[key], args=[token, str(self.hold_ms)]))
            except Exception as exc:  # Redis unreachable: pace in memory only
                self._degrade(exc)
                return None
            if left_ms == 0:
                return token
            await asyncio.sleep(min(MAX_POLL_SECONDS, left_ms / 1000))

    async def _hand_on(self, host: str, token: str, delay_seconds: float) -> None:
        assert self.redis is not None  # noqa: S101 - a token exists only when Redis gave it
        try:
            await self.redis.eval(
                _HAND_ON, keys=[KEY_PREFIX + host], args=[token, str(max(1, int(delay_seconds * 1000)))]
            )
        except Exception as exc:  # the key then lives out its hold time: slower, never less polite
            self._degrade(exc)

    def _degrade(self, exc: Exception) -> None:
        self.redis = None
        if not self._warned:
            self._warned = True
            log_event(
                "host turns paced in memory: Redis unreachable",
                logging.WARNING,
                **{DECISION_REASON: "politeness-local-only"},
                error_type=type(exc).__name__,
            )
