"""Upstash Redis over its REST API, one client per event loop.

Functions reach Redis only through ``upstash-redis`` (HTTPS, no TCP connection to keep warm): in
production against Upstash, locally and in tests against ``shared/local/redis_bridge.py``. The
client's HTTP connection pool belongs to the event loop it was first used on, and Mangum may start a
new loop per invocation, so ``get_redis()`` keeps one client per running loop and creates it on first
use; nothing depends on a startup hook.

A circuit breaker sits in each client's transport. A Redis that accepts connections but never
answers costs a request timeout per command, and a chat turn sends up to three (the visitor's limit,
then the burst limit before the embedding and before the reply): three sequential timeouts. After
one timeout the breaker opens for ``BREAKER_OPEN_SECONDS``: every command fails at once with
``RedisCircuitOpen`` (an ``httpx.TransportError``, so every caller's "Redis unreachable" fallback
applies unchanged) instead of waiting. Then one request at a time is let through as a probe; an
answer closes the breaker, another timeout opens it again. The breaker belongs to the process and
the endpoint, not the event loop, so it survives Mangum's new loop per invocation. Only timeouts
open it: a refused connection fails fast already and says more in the log.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from upstash_redis.asyncio import Redis

from shared.settings import get_settings

REQUEST_TIMEOUT_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 1.0
BREAKER_OPEN_SECONDS = 15.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()


class RedisCircuitOpen(httpx.TransportError):
    """Redis timed out moments ago: not asked again until the breaker lets a probe through."""


@dataclass
class CircuitBreaker:
    """Closed: requests pass. Open (after a timeout): requests fail at once until ``open_until``.
    Then half-open: one probe passes while the others still fail at once; its outcome decides."""

    open_seconds: float = BREAKER_OPEN_SECONDS
    open_until: float = 0.0
    probing: bool = field(default=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def admit(self) -> bool:
        """Whether a request may go to Redis now; ``True`` makes the caller the probe when half-open."""
        if self.open_until == 0.0:
            return True
        if self.probing or self.clock() < self.open_until:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.open_until = 0.0
        self.probing = False

    def timed_out(self) -> None:
        self.open_until = self.clock() + self.open_seconds
        self.probing = False

    def gave_up(self) -> None:
        """The probe ended another way (refused, cancelled): a later request probes again."""
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.open_until != 0.0


class _BreakerTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.breaker.admit():
            raise RedisCircuitOpen("Redis timed out recently; not waiting for it again yet", request=request)
        probe = self.breaker.probing  # admitted while half-open: this request is the probe
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TimeoutException:
            self.breaker.timed_out()
            raise
        except BaseException:
            if probe:
                self.breaker.gave_up()
            raise
        self.breaker.succeeded()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# One breaker per endpoint for the whole process: every loop's client for a URL shares it.
_breakers: dict[str, CircuitBreaker] = {}


def breaker_for(url: str) -> CircuitBreaker:
    return _breakers.setdefault(url, CircuitBreaker())


def make_redis(
    url: str,
    token: str,
    *,
    timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
    breaker: CircuitBreaker | None = None,
) -> Redis:
    """A new client for the Upstash REST endpoint ``url``; the caller closes it (``await client.close()``).

    Its requests pass ``breaker`` (by default the process's breaker for ``url``)."""
    client = Redis(
        url=url,
        token=token,
        # Upstash base64-encodes every string it returns, so any stored bytes survive the JSON envelope.
        rest_encoding="base64",
        # The client retries after any failure, a read timeout included, when the command may already
        # have run: a retried INCR or rate-limit script would count twice. Callers decide instead.
        rest_retries=0,
        # Telemetry headers would carry platform details, and each upstash-ratelimit Ratelimit built on
        # a telemetry-enabled client appends to one of them.
        allow_telemetry=False,
    )
    # upstash-redis builds its httpx client without any timeout and has no option for one; httpx lets
    # the timeout of an existing client be replaced, so a stalled request fails in seconds instead of
    # holding the function until the platform kills it.
    http = client._http._client
    http.timeout = httpx.Timeout(timeout_seconds, connect=min(CONNECT_TIMEOUT_SECONDS, timeout_seconds))
    # Likewise its transport is wrapped, since upstash-redis takes none: every command passes the breaker.
    http._transport = _BreakerTransport(http._transport, breaker or breaker_for(url))
    return client


def get_redis() -> Redis:
    """The client for the running event loop, built from settings on first use on that loop."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        settings = get_settings()
        client = make_redis(
            settings.upstash_redis_rest_url,
            settings.upstash_redis_rest_token.get_secret_value(),
            timeout_seconds=settings.upstash_redis_timeout_seconds,
        )
        _clients[loop] = client
    return client


async def close_redis() -> None:
    """Close the running loop's client, if it has one (end of a worker run, test teardown)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.close()
