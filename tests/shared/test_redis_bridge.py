"""The local Redis REST bridge speaks Upstash's protocol, proved with the clients production uses.

Everything goes over a real loopback socket to the bridge and from there to the real Redis; raw
HTTP (httpx) is used only where the wire format itself is the point.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Mount
from upstash_redis.asyncio import Redis
from upstash_redis.errors import UpstashError

from shared.local.redis_bridge import create_bridge, portable_script
from shared.redis import close_redis, get_redis, make_redis
from shared.settings import get_settings
from tests.conftest import REDIS_URL

# What upstash-ratelimit declares; stock Redis refuses the flag.
UPSTASH_SCRIPT = '#!lua flags=allow-key-locking\nreturn redis.call("INCRBY", KEYS[1], ARGV[1])'


@pytest.fixture
async def http(redis_bridge: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    url, token = redis_bridge
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5) as client:
        yield client


class TestCommands:
    async def test_set_then_get_returns_the_value(self, upstash: Redis, key_prefix: str) -> None:
        stored: object = await upstash.set(f"{key_prefix}k", "value")  # typed Optional[str], returns True
        assert stored is True
        assert await upstash.get(f"{key_prefix}k") == "value"

    async def test_a_missing_key_is_none(self, upstash: Redis, key_prefix: str) -> None:
        assert await upstash.get(f"{key_prefix}missing") is None

    async def test_incr_and_expire_act_on_the_real_redis(
        self, upstash: Redis, key_prefix: str, direct_redis: redis.Redis
    ) -> None:
        key = f"{key_prefix}counter"
        assert await upstash.incr(key) == 1
        assert await upstash.incrby(key, 41) == 42
        assert await upstash.expire(key, 60) is True
        assert 0 < await upstash.ttl(key) <= 60
        assert direct_redis.get(key) == b"42"

    async def test_a_failing_command_raises_with_the_redis_error_line(self, upstash: Redis, key_prefix: str) -> None:
        await upstash.set(f"{key_prefix}text", "not a number")
        with pytest.raises(UpstashError, match=r"^ERR value is not an integer"):
            await upstash.incr(f"{key_prefix}text")

    async def test_a_failing_command_is_status_400_with_an_error_field(
        self, http: httpx.AsyncClient, key_prefix: str
    ) -> None:
        response = await http.post("/", json=["GET", f"{key_prefix}a", "extra"])
        assert response.status_code == 400
        assert response.json() == {"error": "ERR wrong number of arguments for 'get' command"}

    async def test_numbers_in_the_command_array_are_sent_as_their_decimal_text(
        self, http: httpx.AsyncClient, key_prefix: str
    ) -> None:
        response = await http.post("/", json=["SET", f"{key_prefix}n", 7, "EX", 100])
        assert response.json() == {"result": "OK"}
        response = await http.post("/", json=["INCRBYFLOAT", f"{key_prefix}n", 0.5])
        assert response.json() == {"result": "7.5"}

    async def test_a_body_that_is_not_a_command_is_status_400(self, http: httpx.AsyncClient) -> None:
        for body in (b"not json", b"{}", b"[]", b"[null]", b'["GET", null]'):
            response = await http.post("/", content=body)
            assert response.status_code == 400, body
            assert set(response.json()) == {"error"}, body

    async def test_commands_that_change_connection_state_are_refused(self, http: httpx.AsyncClient) -> None:
        for command in (["SELECT", "1"], ["MULTI"], ["WATCH", "k"], ["CLIENT", "SETNAME", "x"], ["HELLO", "3"]):
            response = await http.post("/", json=command)
            assert response.status_code == 400, command
            assert "not available" in response.json()["error"], command


class TestPipeline:
    async def test_a_pipeline_returns_one_result_per_command_in_order(self, upstash: Redis, key_prefix: str) -> None:
        pipeline = upstash.pipeline()
        pipeline.set(f"{key_prefix}a", "1")
        pipeline.incr(f"{key_prefix}a")
        pipeline.get(f"{key_prefix}a")
        pipeline.expire(f"{key_prefix}a", 30)
        pipeline.get(f"{key_prefix}missing")
        assert await pipeline.exec() == [True, 2, "2", True, None]

    async def test_a_failing_command_fails_alone(self, http: httpx.AsyncClient, key_prefix: str) -> None:
        response = await http.post(
            "/pipeline",
            json=[["SET", f"{key_prefix}a", "x"], ["INCR", f"{key_prefix}a"], ["GET", f"{key_prefix}a"]],
        )
        assert response.status_code == 200
        assert response.json() == [
            {"result": "OK"},
            {"error": "ERR value is not an integer or out of range"},
            {"result": "x"},
        ]

    async def test_an_empty_pipeline_is_an_empty_array(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/pipeline", json=[])
        assert (response.status_code, response.json()) == (200, [])


class TestMultiExec:
    async def test_a_transaction_returns_one_result_per_command(self, upstash: Redis, key_prefix: str) -> None:
        transaction = upstash.multi()
        transaction.set(f"{key_prefix}a", "1")
        transaction.incr(f"{key_prefix}a")
        transaction.get(f"{key_prefix}a")
        assert await transaction.exec() == [True, 2, "2"]

    async def test_a_command_failing_at_run_time_fails_alone(self, http: httpx.AsyncClient, key_prefix: str) -> None:
        response = await http.post(
            "/multi-exec", json=[["SET", f"{key_prefix}a", "x"], ["INCR", f"{key_prefix}a"], ["GET", f"{key_prefix}a"]]
        )
        assert response.status_code == 200
        assert response.json()[1] == {"error": "ERR value is not an integer or out of range"}

    async def test_a_discarded_transaction_is_one_error_and_runs_nothing(
        self, http: httpx.AsyncClient, key_prefix: str, direct_redis: redis.Redis
    ) -> None:
        response = await http.post("/multi-exec", json=[["SET", f"{key_prefix}a", "x"], ["NOSUCHCOMMAND", "y"]])
        assert response.status_code == 400
        assert response.json()["error"].startswith("ERR unknown command")
        assert direct_redis.exists(f"{key_prefix}a") == 0


class TestEncoding:
    VALUES = (
        "héllo wörld",
        "emoji 🚀 and CJK 漢字",
        "control \x00\x01\t\n characters",
        "T0s=",  # looks like base64 already
        "OK",  # the one string Upstash leaves unencoded when it is a status reply
        '{"json": [1, 2]}',
        "",
    )

    @pytest.mark.parametrize("encoding", ["base64", None])
    async def test_text_round_trips_through_both_encodings(
        self, redis_bridge: tuple[str, str], key_prefix: str, encoding: str | None
    ) -> None:
        url, token = redis_bridge
        async with Redis(url, token, rest_encoding="base64" if encoding else None, allow_telemetry=False) as client:
            for index, value in enumerate(self.VALUES):
                await client.set(f"{key_prefix}{index}", value)
                assert await client.get(f"{key_prefix}{index}") == value
            assert await client.mget(*(f"{key_prefix}{i}" for i in range(len(self.VALUES)))) == list(self.VALUES)

    async def test_binary_values_come_back_byte_for_byte_in_base64(
        self, http: httpx.AsyncClient, key_prefix: str, direct_redis: redis.Redis
    ) -> None:
        raw = bytes(range(256))
        direct_redis.set(f"{key_prefix}bin", raw)
        response = await http.post("/", json=["GET", f"{key_prefix}bin"], headers={"Upstash-Encoding": "base64"})
        assert base64.b64decode(response.json()["result"]) == raw

    async def test_without_encoding_invalid_utf8_is_replaced(
        self, http: httpx.AsyncClient, key_prefix: str, direct_redis: redis.Redis
    ) -> None:
        direct_redis.set(f"{key_prefix}bin", b"ok\xff")
        response = await http.post("/", json=["GET", f"{key_prefix}bin"])
        assert response.json() == {"result": "ok\ufffd"}

    async def test_base64_leaves_a_top_level_ok_plain_and_encodes_everything_else(
        self, http: httpx.AsyncClient, key_prefix: str
    ) -> None:
        headers = {"Upstash-Encoding": "base64"}
        set_response = await http.post("/", json=["SET", f"{key_prefix}a", "bar"], headers=headers)
        assert set_response.json() == {"result": "OK"}
        get_response = await http.post("/", json=["GET", f"{key_prefix}a"], headers=headers)
        assert get_response.json() == {"result": "YmFy"}
        ping_response = await http.post("/", json=["PING"], headers=headers)
        assert ping_response.json() == {"result": "UE9ORw=="}
        nested = await http.post("/", json=["EVAL", "return {1, 'OK', false}", 0], headers=headers)
        assert nested.json() == {"result": [1, "T0s=", None]}


class TestAuthentication:
    async def test_a_wrong_token_is_401(self, redis_bridge: tuple[str, str]) -> None:
        url, _ = redis_bridge
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/", json=["PING"], headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401
        assert set(response.json()) == {"error"}

    async def test_a_missing_token_is_401_on_every_endpoint(self, redis_bridge: tuple[str, str]) -> None:
        url, _ = redis_bridge
        async with httpx.AsyncClient(base_url=url) as client:
            for path in ("/", "/pipeline", "/multi-exec", "/get/k"):
                response = await client.post(path, json=[["PING"]] if path != "/" else ["PING"])
                assert response.status_code == 401, path

    async def test_the_client_with_a_wrong_token_raises(self, redis_bridge: tuple[str, str]) -> None:
        url, _ = redis_bridge
        client = make_redis(url, "wrong")
        try:
            with pytest.raises(UpstashError, match="Unauthorized"):
                await client.ping()
        finally:
            await client.close()

    async def test_the_token_query_parameter_is_accepted(self, redis_bridge: tuple[str, str]) -> None:
        url, token = redis_bridge
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/ping", params={"_token": token})
        assert response.json() == {"result": "PONG"}

    def test_a_bridge_without_a_token_cannot_be_built(self) -> None:
        with pytest.raises(ValueError, match="token"):
            create_bridge(REDIS_URL, "")


class TestScripts:
    async def test_a_script_with_an_upstash_only_flag_runs_on_stock_redis(
        self, upstash: Redis, key_prefix: str
    ) -> None:
        assert await upstash.eval(UPSTASH_SCRIPT, keys=[f"{key_prefix}n"], args=["5"]) == 5

    async def test_evalsha_accepts_the_digest_of_the_script_the_client_sent(
        self, upstash: Redis, key_prefix: str
    ) -> None:
        digest = hashlib.sha1(UPSTASH_SCRIPT.encode(), usedforsecurity=False).hexdigest()
        await upstash.eval(UPSTASH_SCRIPT, keys=[f"{key_prefix}n"], args=["1"])
        assert await upstash.evalsha(digest, keys=[f"{key_prefix}n"], args=["2"]) == 3

    async def test_script_load_answers_with_the_client_digest(self, upstash: Redis, key_prefix: str) -> None:
        script = f"{UPSTASH_SCRIPT}\n-- {secrets.token_hex(8)}"  # never loaded before
        digest = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        assert await upstash.script_exists(digest) == [False]
        assert await upstash.script_load(script) == digest
        assert await upstash.script_exists(digest) == [True]
        assert await upstash.evalsha(digest, keys=[f"{key_prefix}n"], args=["4"]) == 4

    async def test_an_unknown_digest_is_noscript(self, upstash: Redis) -> None:
        with pytest.raises(UpstashError, match=r"^NOSCRIPT "):
            await upstash.evalsha(secrets.token_hex(20))

    def test_only_upstash_only_flags_are_dropped(self) -> None:
        assert portable_script(b"#!lua flags=allow-key-locking\nreturn 1") == b"#!lua\nreturn 1"
        assert portable_script(b"#!lua flags=no-writes,allow-key-locking\nreturn 1") == (
            b"#!lua flags=no-writes\nreturn 1"
        )
        assert portable_script(b"return 1") == b"return 1"


class TestPathStyle:
    async def test_path_style_commands_with_body_and_query_arguments(
        self, http: httpx.AsyncClient, key_prefix: str
    ) -> None:
        key = f"{key_prefix}p"
        assert (await http.get(f"/set/{key}/a%2Fb")).json() == {"result": "OK"}
        assert (await http.get(f"/get/{key}")).json() == {"result": "a/b"}
        assert (await http.post(f"/set/{key}", content=b"from body", params={"EX": "100"})).json() == {"result": "OK"}
        assert (await http.get(f"/get/{key}")).json() == {"result": "from body"}
        ttl = (await http.get(f"/ttl/{key}")).json()["result"]
        assert 0 < ttl <= 100


class TestMounting:
    async def test_the_bridge_works_mounted_under_a_prefix(
        self, redis_bridge: tuple[str, str], key_prefix: str
    ) -> None:
        _, token = redis_bridge
        bridge = create_bridge(REDIS_URL, token)
        parent = Starlette(routes=[Mount("/upstash", app=bridge)])
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            bridge.router.lifespan_context(bridge),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=parent), base_url="http://dev") as client,
        ):
            response = await client.post("/upstash/pipeline", json=[["SET", f"{key_prefix}m", "1"]], headers=headers)
            assert response.json() == [{"result": "OK"}]
            response = await client.get(f"/upstash/get/{key_prefix}m", headers=headers)
            assert response.json() == {"result": "1"}


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback server that accepts connections and never answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    host, port = listener.getsockname()
    try:
        yield f"http://{host}:{port}"
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


class TestClientFactory:
    async def test_a_stalled_request_fails_within_the_timeout(self, silent_server: str) -> None:
        client = make_redis(silent_server, "token", timeout_seconds=0.3)
        started = time.monotonic()
        try:
            with pytest.raises(httpx.TimeoutException):
                await client.get("k")
        finally:
            await client.close()
        assert time.monotonic() - started < 2

    @pytest.fixture
    def settings_for_bridge(self, redis_bridge: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        url, token = redis_bridge
        monkeypatch.setenv("UPSTASH_REDIS_REST_URL", url)
        monkeypatch.setenv("UPSTASH_REDIS_REST_TOKEN", token)
        get_settings.cache_clear()
        yield
        get_settings.cache_clear()

    @pytest.mark.usefixtures("settings_for_bridge")
    def test_get_redis_keeps_one_client_per_event_loop(self) -> None:
        async def ping_twice() -> list[str]:
            client = get_redis()
            try:
                assert get_redis() is client
                return [await client.ping(), await get_redis().ping()]
            finally:
                await close_redis()

        # A new loop gets a client of its own, as under Mangum; the first loop's client is closed and gone.
        assert asyncio.run(ping_twice()) == ["PONG", "PONG"]
        assert asyncio.run(ping_twice()) == ["PONG", "PONG"]
