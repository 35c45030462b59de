"""Readiness: each dependency checked with a short timeout, reported separately, never a hang.

The body names each dependency and its state, never hosts, URLs or error text from drivers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from pydantic import BaseModel

from shared.db.session import Database, as_service

CHECK_TIMEOUT_SECONDS = 2.0


class DependencyStatus(BaseModel):
    status: Literal["ok", "down"]
    latency_ms: float
    reason: Literal["timeout", "unavailable"] | None = None


class Readiness(BaseModel):
    status: Literal["ready", "degraded"]
    checks: dict[str, DependencyStatus]


async def _timed(check: Callable[[], Awaitable[object]]) -> DependencyStatus:
    started = time.perf_counter()
    reason: Literal["timeout", "unavailable"] | None = None
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            await check()
    except TimeoutError:
        reason = "timeout"
    except Exception:  # any failure of a dependency is reported as "down", never raised
        reason = "unavailable"
    latency = round((time.perf_counter() - started) * 1000, 1)
    return DependencyStatus(status="down" if reason else "ok", latency_ms=latency, reason=reason)


async def readiness(db: Database) -> Readiness:
    async def database() -> None:
        async with as_service(db) as conn:
            await conn.execute("select 1")

    async def redis() -> None:
        from shared.redis import get_redis  # the Redis client is loaded only by readiness

        if not await get_redis().ping():
            raise ConnectionError("redis did not answer PONG")

    db_status, redis_status = await asyncio.gather(_timed(database), _timed(redis))
    checks = {"database": db_status, "redis": redis_status}
    ready = all(c.status == "ok" for c in checks.values())
    return Readiness(status="ready" if ready else "degraded", checks=checks)
