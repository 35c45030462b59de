"""Rate limits: how many hits a (bucket, identifier) pair may make per window, counted in Redis.

A bucket names one limit ("widget-agent", "model-burst"); the identifier is what is limited within it
(an agent id, an organization id, an address). Keys are ``hh:rl:<bucket>:<identifier>:<window>``.

Algorithm: upstash-ratelimit's sliding window. A fixed window lets a client spend its whole limit
at the end of one window and again at the start of the next, twice the limit within a few seconds,
which is exactly the burst these limits exist to stop. A sliding window counts the current window
plus the previous one weighted by how much of it still overlaps the last ``window_seconds``, so no
stretch of ``window_seconds`` admits much more than ``limit``. It costs the same as a fixed window:
two counters per identifier and one script call per hit, atomic in Redis, and it keeps the "N per
window" meaning a limit is configured with, which a token bucket would not. ``hit_many`` sends the
script calls of several hits in one HTTP request.

This module decides; it raises no HTTP error. The caller turns a denial into
``shared.errors.RateLimited(decision.retry_after)``. Redis failures propagate (``UpstashError``,
``httpx.HTTPError``): whether a limit fails open or closed is the caller's decision.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from upstash_redis.asyncio import Redis

KEY_PREFIX = "hh:rl"
MAX_IDENTIFIER_LENGTH = 256
# No ":" in a bucket, so a bucket's keys can never be confused with another bucket's.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_at: float
    """Unix time, in seconds, at which the current window ends."""
    retry_after: int
    """Whole seconds to wait before a retry can pass: 0 when allowed, at least 1 when denied."""


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """A named limit, declared once where it is enforced: ``RateLimitRule("widget-agent", 30, 60)``."""

    bucket: str
    limit: int
    window_seconds: int

    def __post_init__(self) -> None:
        _check_rule(self.bucket, self.limit, self.window_seconds)


def _check_rule(bucket: str, limit: int, window_seconds: int) -> None:
    if not _BUCKET.fullmatch(bucket):
        raise ValueError("a rate-limit bucket is 1-64 characters of a-z, 0-9, '_', '.', '-'")
    if limit < 1 or window_seconds < 1:
        raise ValueError("a rate limit needs limit >= 1 and window_seconds >= 1")


def bucket_prefix(bucket: str) -> str:
    """Every key of ``bucket`` starts with this, followed by ``:<identifier>:<window>``."""
    return f"{KEY_PREFIX}:{bucket}"


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One hit to count for ``identifier`` against ``rule``."""

    rule: RateLimitRule
    identifier: str

    def __post_init__(self) -> None:
        if not self.identifier or len(self.identifier) > MAX_IDENTIFIER_LENGTH:
            raise ValueError(f"a rate-limit identifier is 1-{MAX_IDENTIFIER_LENGTH} characters")


async def hit(redis: Redis, *, bucket: str, identifier: str, limit: int, window_seconds: int) -> RateLimitDecision:
    """Count one hit for ``identifier`` in ``bucket`` and decide whether it may pass."""
    (decision,) = await hit_many(redis, [LimitCheck(RateLimitRule(bucket, limit, window_seconds), identifier)])
    return decision


async def hit_many(redis: Redis, checks: Sequence[LimitCheck]) -> list[RateLimitDecision]:
    """Count every check in one Redis request and decide each, in order.

    Each check is upstash-ratelimit's own sliding window, counted independently and in order (the
    same check twice counts two hits): a check that is refused does not stop the others from
    counting, so put together only limits that should all be charged for the request. The limiter
    yields the one command it needs and takes its result back (its ``_limit`` generator, which its
    own ``limit_async`` drives the same way), so the commands of several limits travel as one
    Upstash pipeline instead of one request each.
    """
    if not checks:
        return []
    from upstash_ratelimit.asyncio import SlidingWindow  # loaded by the first limited request

    pending = []
    pipeline = redis.pipeline()
    for check in checks:
        rule = check.rule
        limiter = SlidingWindow(max_requests=rule.limit, window=rule.window_seconds, unit="s")
        # The same key as upstash_ratelimit.asyncio.Ratelimit(prefix=...).limit(identifier). The limiter
        # is used directly because a Ratelimit built on every hit appends to the client's telemetry
        # header each time when telemetry is enabled.
        generator = limiter._limit(f"{bucket_prefix(rule.bucket)}:{check.identifier}")
        command, arguments = next(generator)
        if command != "eval":  # pragma: no cover - the sliding window always evaluates its script
            raise RuntimeError(f"unexpected rate-limit command {command!r}")
        pipeline.eval(*arguments)
        pending.append(generator)
    results = await pipeline.exec()
    now = time.time()
    decisions = []
    for generator, result in zip(pending, results, strict=True):
        response = generator.send(result)
        retry_after = 0 if response.allowed else max(1, math.ceil(response.reset - now))
        decisions.append(
            RateLimitDecision(
                allowed=response.allowed,
                limit=response.limit,
                remaining=response.remaining,
                reset_at=response.reset,
                retry_after=retry_after,
            )
        )
    return decisions


async def check(redis: Redis, rule: RateLimitRule, identifier: str) -> RateLimitDecision:
    """``hit`` for a declared rule."""
    return await hit(
        redis, bucket=rule.bucket, identifier=identifier, limit=rule.limit, window_seconds=rule.window_seconds
    )


async def enforce(
    rule: RateLimitRule,
    identifier: str,
    *,
    detail: str,
    unavailable_reason: str | None = None,
    **log_fields: Any,
) -> None:
    """Raise ``RateLimited`` when ``identifier`` is over ``rule``; let the request through if Redis is down.

    For limits that guard our own capacity (model bursts, outbound requests a dashboard user can
    trigger), where refusing everyone while Redis is unreachable would be worse than a short
    unmetered window. The pass is logged with ``unavailable_reason`` (default ``<bucket>-unchecked``)
    and the caller's ``log_fields``.
    """
    from shared.errors import RateLimited
    from shared.logs import DECISION_REASON, log_event
    from shared.redis import get_redis

    try:
        decision = await check(get_redis(), rule, identifier)
    except Exception as exc:  # the limiter's store failed; the request itself is still authorised
        log_event(
            "rate limit not checked: Redis is unreachable",
            logging.WARNING,
            **{**log_fields, DECISION_REASON: unavailable_reason or f"{rule.bucket}-unchecked"},
            error_type=type(exc).__name__,
        )
        return
    if not decision.allowed:
        raise RateLimited(decision.retry_after, detail)
