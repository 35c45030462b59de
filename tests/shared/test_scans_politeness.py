"""Host turns (shared/scans/politeness.py) against the real Redis, through the Upstash bridge.

A turn is a lease on one key per host: whoever is inside a turn must be the key's holder, for as long
as the turn lasts, or a second invocation can take the host at the same time.
"""

from __future__ import annotations

import asyncio
import uuid

import redis
from upstash_redis.asyncio import Redis

from shared.scans.politeness import KEY_PREFIX, HostTurns


def _host() -> str:
    return f"turns-{uuid.uuid4().hex}.example:80"


class TestTurns:
    async def test_a_turn_waits_for_the_other_holder_to_the_last_millisecond(
        self, upstash: Redis, direct_redis: redis.Redis
    ) -> None:
        # The other holder's key runs out just as this one asks for it: in its very last millisecond
        # Redis still has the key (PTTL 0), and a turn taken then would run next to whoever takes the
        # key a moment later. Keys of 1-3 ms make some of the first asks land in that millisecond.
        turns = HostTurns(upstash, hold_seconds=5)
        wrong: list[object] = []
        for n in range(60):
            host = _host()
            key = KEY_PREFIX + host
            direct_redis.set(key, "other", px=1 + n % 3)
            try:
                async with turns.turn(host, 0):
                    holder = direct_redis.get(key)
                    if holder in (None, b"other"):
                        wrong.append(holder)
            finally:
                direct_redis.delete(key)
        assert turns.redis is upstash, "Redis stayed reachable throughout"
        assert wrong == [], f"{len(wrong)} of 60 turns began while the key was not theirs: {wrong[:5]}"

    async def test_turns_of_many_invocations_at_one_host_never_overlap(
        self, upstash: Redis, direct_redis: redis.Redis
    ) -> None:
        # Four crawlers (as if in four invocations) take turns at one host with a short pause between.
        host = _host()
        in_flight = 0
        most = 0
        turns_taken = 0

        async def crawler() -> None:
            nonlocal in_flight, most, turns_taken
            turns = HostTurns(upstash, hold_seconds=5)
            for _ in range(8):
                async with turns.turn(host, 0.005):
                    in_flight += 1
                    most = max(most, in_flight)
                    await asyncio.sleep(0.002)  # the request
                    in_flight -= 1
                    turns_taken += 1

        try:
            await asyncio.gather(*(crawler() for _ in range(4)))
        finally:
            direct_redis.delete(KEY_PREFIX + host)
        assert turns_taken == 32
        assert most == 1, "two turns at one host at once"
