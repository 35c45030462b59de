"""Rate limits through upstash-ratelimit, the REST bridge and the real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from upstash_redis.asyncio import Redis

from shared.errors import RateLimited
from shared.ratelimit import LimitCheck, RateLimitRule, bucket_prefix, check, enforce, hit, hit_many
from shared.redis import close_redis
from shared.settings import get_settings
from tests.conftest import counting_requests, forget_keys
from tests.factories import closed_port

# Long windows keep a test from straddling a window boundary; the last test uses a short one on purpose.
HOUR = 3600


@pytest.fixture
def bucket(direct_redis: redis.Redis) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:16]}"
    yield name
    forget_keys(direct_redis, f"{bucket_prefix(name)}:*")


class TestHit:
    async def test_allows_exactly_the_limit_then_denies_with_a_retry_after(self, upstash: Redis, bucket: str) -> None:
        decisions = [
            await hit(upstash, bucket=bucket, identifier="agent-1", limit=3, window_seconds=HOUR) for _ in range(5)
        ]
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0, 0]
        assert all(d.limit == 3 for d in decisions)
        assert all(d.retry_after == 0 for d in decisions[:3])
        denied = decisions[3]
        assert 0 < denied.retry_after <= HOUR
        assert denied.retry_after >= denied.reset_at - time.time() > 0

    async def test_each_identifier_has_its_own_count(self, upstash: Redis, bucket: str) -> None:
        for _ in range(2):
            assert (await hit(upstash, bucket=bucket, identifier="a", limit=2, window_seconds=HOUR)).allowed
        assert not (await hit(upstash, bucket=bucket, identifier="a", limit=2, window_seconds=HOUR)).allowed
        other = await hit(upstash, bucket=bucket, identifier="b", limit=2, window_seconds=HOUR)
        assert (other.allowed, other.remaining) == (True, 1)

    async def test_each_bucket_has_its_own_count(self, upstash: Redis, bucket: str, direct_redis: redis.Redis) -> None:
        other_bucket = f"{bucket}-other"
        try:
            assert (await hit(upstash, bucket=bucket, identifier="a", limit=1, window_seconds=HOUR)).allowed
            assert (await hit(upstash, bucket=other_bucket, identifier="a", limit=1, window_seconds=HOUR)).allowed
        finally:
            forget_keys(direct_redis, f"{bucket_prefix(other_bucket)}:*")

    async def test_concurrent_hits_never_exceed_the_limit(self, upstash: Redis, bucket: str) -> None:
        decisions = await asyncio.gather(
            *(hit(upstash, bucket=bucket, identifier="a", limit=5, window_seconds=HOUR) for _ in range(20))
        )
        assert sum(d.allowed for d in decisions) == 5

    async def test_counts_live_under_the_bucket_prefix_with_an_expiry(
        self, upstash: Redis, bucket: str, direct_redis: redis.Redis
    ) -> None:
        await hit(upstash, bucket=bucket, identifier="org-7", limit=10, window_seconds=HOUR)
        keys = list(direct_redis.scan_iter(match=f"hh:rl:{bucket}:org-7:*"))
        assert len(keys) == 1
        assert direct_redis.get(keys[0]) == b"1"
        assert 0 < direct_redis.pttl(keys[0]) <= 2 * HOUR * 1000 + 1000

    async def test_a_denied_caller_passes_again_after_retry_after(self, upstash: Redis, bucket: str) -> None:
        # Hit until denied: with a one-second window two hits may straddle a boundary.
        for _ in range(3):
            denied = await hit(upstash, bucket=bucket, identifier="a", limit=1, window_seconds=1)
            if not denied.allowed:
                break
        assert not denied.allowed
        await asyncio.sleep(denied.retry_after)
        assert (await hit(upstash, bucket=bucket, identifier="a", limit=1, window_seconds=1)).allowed

    @pytest.mark.parametrize(
        ("bucket_name", "identifier", "limit", "window_seconds"),
        [
            ("has:colon", "a", 1, 1),
            ("Upper", "a", 1, 1),
            ("", "a", 1, 1),
            ("ok", "", 1, 1),
            ("ok", "x" * 257, 1, 1),
            ("ok", "a", 0, 1),
            ("ok", "a", 1, 0),
        ],
    )
    async def test_malformed_limits_are_refused_before_redis(
        self, upstash: Redis, bucket_name: str, identifier: str, limit: int, window_seconds: int
    ) -> None:
        with pytest.raises(ValueError, match=r"rate-limit|rate limit"):
            await hit(upstash, bucket=bucket_name, identifier=identifier, limit=limit, window_seconds=window_seconds)


class TestHitMany:
    async def test_several_limits_are_counted_in_one_request_each_on_its_own(
        self, upstash: Redis, bucket: str, direct_redis: redis.Redis
    ) -> None:
        other = f"{bucket}-other"
        tight, loose = RateLimitRule(bucket, 1, HOUR), RateLimitRule(other, 5, HOUR)
        checks = [LimitCheck(tight, "a"), LimitCheck(loose, "a"), LimitCheck(loose, "a")]
        try:
            with counting_requests(upstash) as requests:
                first = await hit_many(upstash, checks)
                second = await hit_many(upstash, checks)
            remaining_loose = (await hit(upstash, bucket=other, identifier="a", limit=5, window_seconds=HOUR)).remaining
        finally:
            forget_keys(direct_redis, f"{bucket_prefix(other)}:*")

        assert len(requests) == 2, "one request per hit_many, whatever the number of checks"
        assert [(d.allowed, d.remaining) for d in first] == [(True, 0), (True, 4), (True, 3)]
        # The tight limit refuses; the loose one still counts: each check is its own.
        assert [(d.allowed, d.remaining) for d in second] == [(False, 0), (True, 2), (True, 1)]
        assert second[0].retry_after >= 1
        assert remaining_loose == 0

    async def test_no_checks_make_no_request(self, upstash: Redis) -> None:
        with counting_requests(upstash) as requests:
            assert await hit_many(upstash, []) == []
        assert requests == []

    def test_a_malformed_check_is_refused_before_redis(self, bucket: str) -> None:
        with pytest.raises(ValueError, match="identifier"):
            LimitCheck(RateLimitRule(bucket, 1, HOUR), "")


class TestRule:
    async def test_check_applies_a_declared_rule(self, upstash: Redis, bucket: str) -> None:
        rule = RateLimitRule(bucket, limit=1, window_seconds=HOUR)
        assert (await check(upstash, rule, "agent-9")).allowed
        denied = await check(upstash, rule, "agent-9")
        assert not denied.allowed
        assert denied.retry_after >= 1

    def test_a_malformed_rule_cannot_be_declared(self) -> None:
        with pytest.raises(ValueError, match="bucket"):
            RateLimitRule("no:colons", limit=1, window_seconds=1)


class TestEnforce:
    async def test_passes_within_the_limit_then_raises_rate_limited(self, bucket: str) -> None:
        rule = RateLimitRule(bucket, limit=2, window_seconds=60)
        identifier = uuid.uuid4().hex
        await enforce(rule, identifier, detail="slow down")
        await enforce(rule, identifier, detail="slow down")
        with pytest.raises(RateLimited, match="slow down") as caught:
            await enforce(rule, identifier, detail="slow down")
        assert caught.value.headers["Retry-After"] == str(caught.value.retry_after_seconds)
        assert caught.value.retry_after_seconds >= 1

    async def test_with_redis_unreachable_the_request_passes_and_is_logged(
        self, bucket: str, monkeypatch: pytest.MonkeyPatch, log_lines: list[str]
    ) -> None:
        monkeypatch.setenv("UPSTASH_REDIS_REST_URL", f"http://127.0.0.1:{closed_port()}")
        get_settings.cache_clear()
        await close_redis()
        try:
            rule = RateLimitRule(bucket, limit=1, window_seconds=60)
            for _ in range(3):
                await enforce(rule, "someone", detail="slow down")
        finally:
            await close_redis()
            monkeypatch.undo()
            get_settings.cache_clear()
        assert any(f'"decision_reason":"{bucket}-unchecked"' in line for line in log_lines)
