"""Upstash Redis over its REST API, one client per event loop.

Functions reach Redis only through ``upstash-redis`` (HTTPS, no TCP connection to keep warm): in
production against Upstash, locally and in tests against ``shared/local/redis_bridge.py``. The
client's HTTP connection pool belongs to the event loop it was first used on, and Mangum may start a
new loop per invocation, so ``get_redis()`` keeps one client per running loop and creates it on first
use; nothing depends on a startup hook.
"""

from __future__ import annotations

import asyncio
import weakref

import httpx
from upstash_redis.asyncio import Redis

from shared.settings import get_settings

REQUEST_TIMEOUT_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 1.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = weakref.WeakKeyDictionary()


def make_redis(url: str, token: str, *, timeout_seconds: float = REQUEST_TIMEOUT_SECONDS) -> Redis:
    """A new client for the Upstash REST endpoint ``url``; the caller closes it (``await client.close()``)."""
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
    client._http._client.timeout = httpx.Timeout(timeout_seconds, connect=min(CONNECT_TIMEOUT_SECONDS, timeout_seconds))
    return client


def get_redis() -> Redis:
    """The client for the running event loop, built from settings on first use on that loop."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        settings = get_settings()
        client = make_redis(settings.upstash_redis_rest_url, settings.upstash_redis_rest_token.get_secret_value())
        _clients[loop] = client
    return client


async def close_redis() -> None:
    """Close the running loop's client, if it has one (end of a worker run, test teardown)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.close()
