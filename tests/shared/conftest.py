"""A running Redis REST bridge in front of the real local Redis, shared by every test of a run.

``redis_bridge`` yields ``(url, token)``: what UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN are
in production. Tests build clients from it with ``shared.redis.make_redis`` and keep their keys under
a ``key_prefix`` of their own, which is deleted afterwards.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from upstash_redis.asyncio import Redis

from shared.local.redis_bridge import start_bridge
from shared.redis import make_redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_bridge() -> Iterator[tuple[str, str]]:
    running = start_bridge(REDIS_URL, secrets.token_urlsafe(24))
    try:
        yield running.url, running.token
    finally:
        running.stop()


@pytest.fixture
def direct_redis() -> Iterator[redis.Redis]:
    """A plain TCP client to the same Redis, to look behind the bridge."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key_prefix(direct_redis: redis.Redis) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(direct_redis.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        direct_redis.delete(*keys)


@pytest.fixture
async def upstash(redis_bridge: tuple[str, str]) -> AsyncIterator[Redis]:
    url, token = redis_bridge
    client = make_redis(url, token)
    try:
        yield client
    finally:
        await client.close()
