"""The Redis client's circuit breaker, against a real hung peer on loopback (accepts, never answers)
and the real Redis behind the REST bridge."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.redis import CircuitBreaker, RedisCircuitOpen, make_redis
from tests.factories import closed_port
from tests.fakes.hung_peer import hung_peer

# Long enough for a forwarded command to answer on a loaded CI machine, short enough to keep the
# hung-peer cases quick.
TIMEOUT = 1.0


class TestCircuitBreaker:
    async def test_after_one_timeout_commands_fail_at_once_without_reaching_redis(self) -> None:
        breaker = CircuitBreaker(open_seconds=60)
        async with hung_peer() as peer:
            client = make_redis(peer.url, "token", timeout_seconds=TIMEOUT, breaker=breaker)
            try:
                with pytest.raises(httpx.ReadTimeout):
                    await client.ping()
                assert breaker.is_open
                for _ in range(5):
                    with pytest.raises(RedisCircuitOpen):
                        await client.incr("k")
                assert peer.requests == 1, "only the first command reached the hung peer"
            finally:
                await client.close()

    async def test_the_breaker_is_an_httpx_transport_error_so_every_fallback_applies(self) -> None:
        assert issubclass(RedisCircuitOpen, httpx.TransportError)

    async def test_when_open_time_is_over_one_probe_goes_and_an_answer_closes_the_breaker(
        self, redis_bridge: tuple[str, str]
    ) -> None:
        url, token = redis_bridge
        bridge = urlsplit(url)
        breaker = CircuitBreaker(open_seconds=0.2)
        async with hung_peer() as peer:
            client = make_redis(peer.url, token, timeout_seconds=TIMEOUT, breaker=breaker)
            try:
                with pytest.raises(httpx.ReadTimeout):
                    await client.ping()
                with pytest.raises(RedisCircuitOpen):
                    await client.ping()
                peer.forward_to = (bridge.hostname or "127.0.0.1", bridge.port or 80)  # Redis is back
                await asyncio.sleep(0.25)
                assert await client.ping() == "PONG"
                assert not breaker.is_open
                assert [await client.ping() for _ in range(3)] == ["PONG"] * 3
            finally:
                await client.close()

    async def test_while_half_open_only_one_probe_waits_on_a_hung_redis(self) -> None:
        breaker = CircuitBreaker(open_seconds=0.2)
        async with hung_peer() as peer:
            client = make_redis(peer.url, "token", timeout_seconds=TIMEOUT, breaker=breaker)
            try:
                with pytest.raises(httpx.ReadTimeout):
                    await client.ping()
                await asyncio.sleep(0.25)
                outcomes = await asyncio.gather(*(client.ping() for _ in range(10)), return_exceptions=True)
                assert sum(isinstance(o, httpx.ReadTimeout) for o in outcomes) == 1
                assert sum(isinstance(o, RedisCircuitOpen) for o in outcomes) == 9
                assert peer.requests == 2, "one first timeout, one probe"
                assert breaker.is_open, "the probe timed out: open again"
            finally:
                await client.close()

    async def test_a_refused_connection_does_not_open_it(self) -> None:
        breaker = CircuitBreaker(open_seconds=60)
        client = make_redis(f"http://127.0.0.1:{closed_port()}", "token", timeout_seconds=TIMEOUT, breaker=breaker)
        try:
            for _ in range(2):
                with pytest.raises(httpx.ConnectError):
                    await client.ping()
            assert not breaker.is_open
        finally:
            await client.close()

    async def test_clients_of_one_endpoint_share_its_breaker_across_event_loops(self) -> None:
        async with hung_peer() as peer:
            first = make_redis(peer.url, "token", timeout_seconds=TIMEOUT)
            try:
                with pytest.raises(httpx.ReadTimeout):
                    await first.ping()
            finally:
                await first.close()
            # A new client, as a new invocation's event loop builds one: it does not wait again.
            second = make_redis(peer.url, "token", timeout_seconds=TIMEOUT)
            try:
                with pytest.raises(RedisCircuitOpen):
                    await second.ping()
            finally:
                await second.close()
            assert peer.requests == 1


class TestBreakerProperties:
    """Any sequence of requests, outcomes and elapsed time, on a clock the test controls."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.one_of(
                st.just(("request", "answered")),
                st.just(("request", "timed out")),
                st.just(("request", "refused")),
                st.tuples(st.just("wait"), st.floats(0, 30)),
            ),
            max_size=60,
        )
    )
    def test_a_timeout_costs_one_wait_per_open_period_and_an_answer_closes_it(
        self, steps: list[tuple[str, object]]
    ) -> None:
        now = [0.0]
        breaker = CircuitBreaker(open_seconds=15, clock=lambda: now[0])
        last_timeout: float | None = None
        for kind, value in steps:
            if kind == "wait":
                assert isinstance(value, float)
                now[0] += value
                continue
            admitted = breaker.admit()
            if last_timeout is not None and now[0] - last_timeout < 15:
                assert not admitted, "within the open time after a timeout nothing reaches Redis"
            if not admitted:
                continue
            if value == "answered":
                breaker.succeeded()
                last_timeout = None
                assert not breaker.is_open
            elif value == "timed out":
                breaker.timed_out()
                last_timeout = now[0]
                assert breaker.is_open
            else:
                breaker.gave_up()
            assert not breaker.probing, "a finished request never leaves a probe in flight"

    @settings(max_examples=100, deadline=None)
    @given(st.integers(2, 50))
    def test_once_the_open_time_is_over_exactly_one_of_many_concurrent_requests_probes(self, concurrent: int) -> None:
        now = [0.0]
        breaker = CircuitBreaker(open_seconds=15, clock=lambda: now[0])
        breaker.timed_out()
        now[0] = 15.0
        assert sum(breaker.admit() for _ in range(concurrent)) == 1
