"""The model gateway against the real Postgres and Redis, with the provider replaced at the network edge.

OpenAI is the loopback server of tests/fakes/openai_server.py; the gateway reaches it through its
settings (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) exactly as it reaches OpenAI in production.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row

from shared.db.session import get_database
from shared.errors import BudgetExhausted, ModelUnavailable, RateLimited
from shared.gateway import (
    BURST_BUCKET,
    CAPTURE_LEAD,
    ESCALATE,
    WIDGET_TOOLS,
    ChatMessage,
    ChatResult,
    ToolCall,
    admit_burst,
    chat,
    close_clients,
    embed,
    embed_then,
)
from shared.gateway.offline import EXCERPT_INTRO, NO_MATCH_REPLY
from shared.gateway.schemas import MAX_REPLY_CHARS
from shared.gateway.service import MIN_COMPLETION_TOKENS
from shared.pricing import UnknownModel, cost_microusd
from shared.ratelimit import LimitCheck, RateLimitRule, bucket_prefix
from shared.redis import close_redis
from shared.retrieval import RetrievedChunk
from shared.settings import get_settings
from tests.conftest import Connection, TransactionDatabase, counted_hits, forget_keys
from tests.factories import closed_port, create_agent, create_org
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

Configure = Callable[..., None]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture
async def configure(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Configure]:
    """Configure the code under test through its environment, as production does."""

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield set_env
    await close_clients()
    await close_redis()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
async def gateway(configure: Configure, redis_bridge: tuple[str, str]) -> Configure:
    """The gateway with Redis (through the REST bridge) and no model key: the offline provider."""
    url, token = redis_bridge
    configure(UPSTASH_REDIS_REST_URL=url, UPSTASH_REDIS_REST_TOKEN=token)
    await close_redis()  # a client built from earlier settings would outlive them
    return configure


@pytest.fixture
def online(gateway: Configure, fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reset()
    gateway(
        OPENAI_API_KEY=fake_openai.api_key,
        OPENAI_BASE_URL=fake_openai.base_url,
        MODEL_TIMEOUT_SECONDS="5",
    )
    return fake_openai


@pytest.fixture
def tdb(db: Connection) -> TransactionDatabase:
    return TransactionDatabase(db)


@pytest.fixture
async def org(db: Connection, direct_redis: redis.Redis) -> AsyncIterator[dict[str, Any]]:
    created = await create_org(db)
    yield created
    _forget_burst_counts(direct_redis, created["id"])


@pytest.fixture
async def agent(db: Connection, org: dict[str, Any]) -> dict[str, Any]:
    return await create_agent(db, org)


# -- helpers --------------------------------------------------------------------------------------


def _forget_burst_counts(direct_redis: redis.Redis, org_id: uuid.UUID) -> None:
    forget_keys(direct_redis, f"hh:rl:{BURST_BUCKET}:{org_id}:*")


async def set_limits(conn: Connection, org_id: uuid.UUID, **values: int) -> None:
    await conn.execute("reset role")
    for column, value in values.items():
        assert column in {"monthly_budget_microusd", "burst_per_minute"}
        await conn.execute(
            psycopg.sql.SQL("update public.organization_limits set {} = %s where org_id = %s").format(
                psycopg.sql.Identifier(column)
            ),
            (value, org_id),
        )


async def usage_rows(conn: Connection, org_id: uuid.UUID) -> list[dict[str, Any]]:
    await conn.execute("reset role")
    cur = await conn.execute("select * from public.usage_events where org_id = %s order by id", (org_id,))
    return await cur.fetchall()


async def reservations(conn: Connection, org_id: uuid.UUID) -> list[dict[str, Any]]:
    await conn.execute("reset role")
    cur = await conn.execute(
        "select * from public.budget_reservations where org_id = %s order by created_at", (org_id,)
    )
    return await cur.fetchall()


async def budget_period(conn: Connection, org_id: uuid.UUID) -> dict[str, Any] | None:
    await conn.execute("reset role")
    cur = await conn.execute("select * from public.budget_periods where org_id = %s", (org_id,))
    return await cur.fetchone()


def conversation(text: str) -> list[ChatMessage]:
    return [ChatMessage("system", "You answer for Acme Bikes."), ChatMessage("user", text)]


async def ask(
    database: Any,
    org: dict[str, Any],
    agent: dict[str, Any] | None,
    text: str = "How do refunds work?",
    **overrides: Any,
) -> ChatResult:
    arguments: dict[str, Any] = {
        "org_id": org["id"],
        "agent_id": agent["id"] if agent else None,
        "conversation_id": None,
        "model": "gpt-4o-mini",
        "messages": conversation(text),
        "tools": WIDGET_TOOLS,
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        **overrides,
    }
    return await chat(database, **arguments)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}"


REFUNDS = RetrievedChunk(
    id=1,
    url="https://acme.example/refunds",
    title="Refunds",
    content="Orders can be returned within 30 days. Refunds go back to the original card within five days.",
    score=0.03,
)


# -- tests ----------------------------------------------------------------------------------------


class TestMetering:
    async def test_a_call_writes_one_usage_row_and_settles_to_the_real_cost(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        conversation_id = uuid.uuid4()
        online.reply.prompt_tokens, online.reply.completion_tokens = 1234, 56
        result = await ask(tdb, org, agent, conversation_id=conversation_id, request_id="req-metered")

        expected_cost = cost_microusd("gpt-4o-mini", prompt_tokens=1234, completion_tokens=56)
        assert expected_cost == 219  # 1234 * 0.15 + 56 * 0.60 = 218.7 micro-dollars, rounded up
        assert (result.content, result.tool_calls, result.model, result.offline) == (
            "Happy to help with that.",
            [],
            "gpt-4o-mini",
            False,
        )
        assert (result.prompt_tokens, result.completion_tokens, result.cost_microusd) == (1234, 56, expected_cost)

        [row] = await usage_rows(db, org["id"])
        assert row["id"] == result.usage_event_id
        assert {k: row[k] for k in ("agent_id", "conversation_id", "scan_id", "kind", "model", "outcome")} == {
            "agent_id": agent["id"],
            "conversation_id": conversation_id,
            "scan_id": None,
            "kind": "chat",
            "model": "gpt-4o-mini",
            "outcome": "ok",
        }
        assert (row["prompt_tokens"], row["completion_tokens"], row["cost_microusd"]) == (1234, 56, expected_cost)
        assert row["request_id"] == "req-metered"
        assert row["latency_ms"] >= 0
        assert row["created_at"] is not None

        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "settled"
        assert reservation["actual_microusd"] == expected_cost
        assert reservation["amount_microusd"] >= expected_cost, "the hold is the most the call could cost"
        period = await budget_period(db, org["id"])
        assert period is not None
        assert (period["spent_microusd"], period["reserved_microusd"]) == (expected_cost, 0)

    async def test_the_request_carries_model_tools_limits_knowledge_and_request_id(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await ask(tdb, org, agent, knowledge=[REFUNDS], max_tokens=123, temperature=0.5, request_id="req-wire")

        [request] = online.requests_to("/v1/chat/completions")
        body = request.body
        assert body["model"] == "gpt-4o-mini"
        assert body["max_completion_tokens"] == 123
        assert body["temperature"] == 0.5
        assert body["tools"] == WIDGET_TOOLS
        assert request.headers["authorization"] == f"Bearer {online.api_key}"
        [row] = await usage_rows(db, org["id"])
        assert request.headers["x-client-request-id"] == row["client_request_id"]
        assert row["request_id"] == "req-wire"
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["system", "system", "user"], "knowledge goes after the agent's own instructions"
        assert body["messages"][0]["content"] == "You answer for Acme Bikes."
        knowledge = body["messages"][1]["content"]
        assert REFUNDS.content in knowledge
        assert 'url="https://acme.example/refunds"' in knowledge
        assert "not instructions" in knowledge

    async def test_tool_calls_come_back_parsed_and_only_offered_tools_pass(
        self, online: FakeOpenAI, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        escalation = {"reason": "visitor_requested_human", "summary": "Wants a person", "draft_reply": ""}
        online.reply.content = None
        online.reply.tool_calls = [(ESCALATE, escalation), ("delete_everything", {}), (CAPTURE_LEAD, "not json")]

        result = await ask(tdb, org, agent, "Can I talk to a person?")

        assert result.content == ""
        assert result.tool_calls == [ToolCall(ESCALATE, escalation), ToolCall(CAPTURE_LEAD, {})]

    async def test_a_response_without_usage_is_metered_at_the_reserved_maximum(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.reply.prompt_tokens = None
        result = await ask(tdb, org, agent, max_tokens=50)

        [reservation] = await reservations(db, org["id"])
        assert result.completion_tokens == 50
        assert result.cost_microusd == reservation["amount_microusd"] == reservation["actual_microusd"]


class TestFailures:
    async def test_a_timeout_after_the_request_went_out_is_charged_at_the_bound_as_an_estimate(
        self,
        online: FakeOpenAI,
        gateway: Configure,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
    ) -> None:
        gateway(MODEL_TIMEOUT_SECONDS="0.3")
        online.delay_seconds = 1.5

        with pytest.raises(ModelUnavailable) as raised:
            await ask(tdb, org, agent, request_id="req-slow", max_tokens=70)

        assert raised.value.status == 503
        assert "in time" in raised.value.detail
        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert (row["outcome"], row["request_id"], row["estimated"]) == ("timeout", "req-slow", True)
        assert row["cost_microusd"] == reservation["amount_microusd"] == reservation["actual_microusd"]
        assert row["completion_tokens"] == 70, "every completion token the call allowed"
        assert row["cost_microusd"] == cost_microusd(
            "gpt-4o-mini", prompt_tokens=row["prompt_tokens"], completion_tokens=70
        )
        [request] = online.requests
        assert row["client_request_id"] == request.headers["x-client-request-id"]
        assert row["provider_request_id"] is None, "no answer, so no provider id"
        assert 250 <= row["latency_ms"] < 1500
        assert reservation["status"] == "settled"
        period = await budget_period(db, org["id"])
        assert period is not None
        assert (period["spent_microusd"], period["reserved_microusd"]) == (row["cost_microusd"], 0)

    @pytest.mark.parametrize(
        ("setup", "reason"),
        [
            (lambda fake: setattr(fake, "fail_status", 500), "status 500"),
            (lambda fake: setattr(fake, "fail_status", 429), "provider rate limit"),
            (lambda fake: setattr(fake, "raw_body", {"unexpected": True}), "malformed body"),
            (lambda fake: setattr(fake, "api_key", "sk-rotated"), "key refused"),
        ],
    )
    async def test_a_provider_error_releases_the_reservation_and_is_recorded_as_error(
        self,
        online: FakeOpenAI,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
        setup: Callable[[FakeOpenAI], None],
        reason: str,
    ) -> None:
        real_key = online.api_key
        setup(online)
        try:
            with pytest.raises(ModelUnavailable) as raised:
                await ask(tdb, org, agent)
        finally:
            online.api_key = real_key

        assert "processing your request" not in raised.value.detail, "the provider's text never reaches a caller"
        assert raised.value.__cause__ is None
        [row] = await usage_rows(db, org["id"])
        assert (row["outcome"], row["cost_microusd"], row["prompt_tokens"], row["estimated"]) == (
            "error",
            0,
            0,
            False,
        ), reason
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "released"

    @pytest.mark.usefixtures("online")
    async def test_an_unreachable_provider_is_an_error(
        self,
        gateway: Configure,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
    ) -> None:
        gateway(OPENAI_BASE_URL=closed_port_url() + "/v1")

        with pytest.raises(ModelUnavailable):
            await ask(tdb, org, agent)

        [row] = await usage_rows(db, org["id"])
        assert (row["outcome"], row["cost_microusd"], row["estimated"]) == ("error", 0, False)
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "released", "nothing went out: nothing can be billed"

    async def test_a_call_cancelled_after_the_request_went_out_is_charged_at_the_bound_at_once(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.delay_seconds = 2.0
        task = asyncio.ensure_future(ask(tdb, org, agent))
        assert await asyncio.to_thread(online.request_arrived.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert (row["outcome"], row["estimated"]) == ("cancelled", True)
        assert row["cost_microusd"] == reservation["amount_microusd"] == reservation["actual_microusd"] > 0
        assert reservation["status"] == "settled", "settled at once, not left for the ten-minute sweep"

    async def test_a_connection_lost_after_the_request_went_out_is_charged_at_the_bound(
        self, gateway: Configure, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        received: list[bytes] = []

        async def read_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            received.append(await reader.readexactly(length))
            writer.close()  # the provider has the whole request, and answers nothing

        server = await asyncio.start_server(read_then_hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            gateway(OPENAI_API_KEY="sk-anything", OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1")
            with pytest.raises(ModelUnavailable):
                await ask(tdb, org, agent)
        finally:
            server.close()
            await server.wait_closed()

        assert len(received) == 1
        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert (row["outcome"], row["estimated"]) == ("error", True)
        assert row["cost_microusd"] == reservation["actual_microusd"] == reservation["amount_microusd"]

    async def test_the_provider_s_request_id_and_ours_are_on_the_row(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await ask(tdb, org, agent, request_id="req-turn", knowledge=[REFUNDS])
        await embed(tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["a page"], request_id="req-turn")

        rows = await usage_rows(db, org["id"])
        sent = [request.headers["x-client-request-id"] for request in online.requests]
        assert [row["client_request_id"] for row in rows] == sent
        assert len(set(sent)) == 2, "one id per call, though both calls share the request id"
        # answered_ids may also hold a late answer to an earlier test's call, given up on long ago.
        assert all(row["provider_request_id"] in online.answered_ids for row in rows)
        assert len({row["provider_request_id"] for row in rows}) == 2
        assert {row["request_id"] for row in rows} == {"req-turn"}
        assert not any(row["estimated"] for row in rows)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
COMPLETION_FIELDS = (
    ("choices",),
    ("choices", 0),
    ("choices", 0, "message"),
    ("choices", 0, "message", "content"),
    ("choices", 0, "message", "tool_calls"),
    ("choices", 0, "message", "tool_calls", 0),
    ("choices", 0, "message", "tool_calls", 0, "type"),
    ("choices", 0, "message", "tool_calls", 0, "function"),
    ("choices", 0, "message", "tool_calls", 0, "function", "name"),
    ("choices", 0, "message", "tool_calls", 0, "function", "arguments"),
    ("usage",),
    ("usage", "prompt_tokens"),
    ("usage", "completion_tokens"),
)


def a_completion() -> dict[str, Any]:
    call = {"id": "call_1", "type": "function", "function": {"name": ESCALATE, "arguments": "{}"}}
    message = {"role": "assistant", "content": "Happy to help.", "tool_calls": [call]}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }


@st.composite
def malformed_answers(draw: st.DrawFn) -> bytes:
    """Bytes of any kind, JSON of any shape, or a real completion with one field made anything at all."""
    kind = draw(st.sampled_from(["bytes", "json", "one-field"]))
    if kind == "bytes":
        return draw(st.binary(max_size=120))
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    payload = a_completion()
    path = draw(st.sampled_from(COMPLETION_FIELDS))
    target: Any = payload
    for step in path[:-1]:
        target = target[step]
    huge_counts = st.integers(min_value=2**31 - 2, max_value=2**63)
    long_texts = st.integers(min_value=100_001, max_value=100_050).map(lambda n: "x" * n)
    replacement = draw(JSON_VALUES | huge_counts | long_texts)
    if draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = replacement
    return json.dumps(payload).encode()


class TestMalformedAnswers:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(answer=malformed_answers())
    async def test_any_answer_ends_as_a_metered_reply_or_an_error_that_costs_nothing(
        self,
        answer: bytes,
        online: FakeOpenAI,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
    ) -> None:
        await set_limits(db, org["id"], monthly_budget_microusd=10**15, burst_per_minute=10**6)
        online.raw_bytes = answer
        # Every example runs in the test's one transaction, where now() never moves: tell this
        # example's rows from earlier ones by their ids, not by their order.
        seen_rows = {r["id"] for r in await usage_rows(db, org["id"])}
        seen_holds = {r["id"] for r in await reservations(db, org["id"])}

        try:
            result: ChatResult | None = await ask(tdb, org, agent, max_tokens=50)
        except ModelUnavailable:
            result = None

        [row] = [r for r in await usage_rows(db, org["id"]) if r["id"] not in seen_rows]
        [hold] = [r for r in await reservations(db, org["id"]) if r["id"] not in seen_holds]
        if result is None:
            assert (row["outcome"], row["cost_microusd"], row["estimated"], hold["status"]) == (
                "error",
                0,
                False,
                "released",
            )
            return
        assert row["id"] == result.usage_event_id
        assert (row["outcome"], hold["status"]) == ("ok", "settled")
        assert isinstance(result.content, str)
        assert len(result.content) <= MAX_REPLY_CHARS
        assert all(isinstance(call.arguments, dict) for call in result.tool_calls)
        assert 0 <= row["prompt_tokens"] <= 2**31 - 1
        assert 0 <= row["completion_tokens"] <= 2**31 - 1
        assert (
            row["cost_microusd"]
            == hold["actual_microusd"]
            == cost_microusd(
                "gpt-4o-mini", prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"]
            )
        )


class TestASlowProviderStillBills:
    """From the side of a provider that keeps working, and billing, after we stopped waiting."""

    CALLS = 5

    async def test_calls_that_time_out_are_metered_at_least_at_the_servers_bill_and_the_budget_refuses_more(
        self,
        online: FakeOpenAI,
        gateway: Configure,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
    ) -> None:
        probe_org = await create_org(db)
        await ask(tdb, probe_org, None, "What are your opening hours?")
        [probe] = await reservations(db, probe_org["id"])
        hold = probe["amount_microusd"]
        await set_limits(db, org["id"], monthly_budget_microusd=self.CALLS * hold)
        gateway(MODEL_TIMEOUT_SECONDS="0.5")
        online.reset()
        online.delay_seconds = 1.5  # answers every call, later than we wait

        # Until the budget refuses: each call that reached the server was charged its whole hold.
        # (On a busy machine a call can time out before its request went out: free, and the server
        # never saw it, so one more call is made.)
        outcomes: list[str] = []
        for _ in range(self.CALLS + 3):
            try:
                await ask(tdb, org, agent, "What are your opening hours?")
            except BudgetExhausted:
                outcomes.append("refused")
                break
            except ModelUnavailable:
                outcomes.append("timeout")
        assert outcomes[-1] == "refused", outcomes

        billed = sum(
            cost_microusd("gpt-4o-mini", prompt_tokens=prompt, completion_tokens=completion)
            for prompt, completion in online.billed_tokens()
        )
        rows = await usage_rows(db, org["id"])
        metered = sum(row["cost_microusd"] for row in rows)
        assert len(online.requests) == self.CALLS, "the budget held exactly the calls the server received"
        assert sum(row["estimated"] for row in rows) == self.CALLS
        assert rows[-1]["outcome"] == "rejected"
        assert metered >= billed > 0, f"metered {metered} µ$ for calls the server bills {billed} µ$"
        period = await budget_period(db, org["id"])
        assert period is not None
        assert (period["spent_microusd"], period["reserved_microusd"]) == (metered, 0)


class TestBurstLimit:
    async def test_past_the_burst_limit_calls_are_refused_with_retry_after_and_not_made(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await set_limits(db, org["id"], burst_per_minute=2)
        await ask(tdb, org, agent)
        await ask(tdb, org, agent)

        with pytest.raises(RateLimited) as raised:
            await ask(tdb, org, agent)

        assert 1 <= raised.value.retry_after_seconds <= 60
        assert raised.value.headers["Retry-After"] == str(raised.value.retry_after_seconds)
        assert len(online.requests) == 2
        assert [r["outcome"] for r in await usage_rows(db, org["id"])] == ["ok", "ok"]
        assert len(await reservations(db, org["id"])) == 2, "a refused call reserves nothing"

    @pytest.mark.usefixtures("online")
    async def test_the_limit_is_per_organization(
        self, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await set_limits(db, org["id"], burst_per_minute=1)
        other = await create_org(db)
        await ask(tdb, org, agent)
        with pytest.raises(RateLimited):
            await ask(tdb, org, agent)

        result = await ask(tdb, other, None)
        assert result.usage_event_id > 0

    @pytest.mark.usefixtures("online")
    async def test_a_limit_the_caller_already_read_is_used_as_given(
        self, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await ask(tdb, org, agent, burst_per_minute=1)
        with pytest.raises(RateLimited):
            await ask(tdb, org, agent, burst_per_minute=1)

    @pytest.mark.usefixtures("online")
    async def test_with_redis_unreachable_calls_are_allowed_and_the_fallback_is_logged(
        self,
        gateway: Configure,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
        log_lines: list[str],
    ) -> None:
        gateway(UPSTASH_REDIS_REST_URL=closed_port_url())
        await close_redis()
        await set_limits(db, org["id"], burst_per_minute=1)

        results = [await ask(tdb, org, agent, request_id=f"req-open-{i}") for i in range(3)]

        assert len({r.usage_event_id for r in results}) == 3, "the burst limit cannot be counted, so it is not applied"
        warnings = [json.loads(line) for line in log_lines if "burst-limit-unavailable" in line]
        assert [w["request_id"] for w in warnings] == ["req-open-0", "req-open-1", "req-open-2"]
        assert warnings[0]["level"] == "warning"
        assert warnings[0]["org_id"] == str(org["id"])
        assert warnings[0]["error_type"]

    async def test_with_redis_unreachable_the_monthly_budget_still_caps_spend(
        self,
        online: FakeOpenAI,
        gateway: Configure,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
    ) -> None:
        gateway(UPSTASH_REDIS_REST_URL=closed_port_url())
        await close_redis()
        await set_limits(db, org["id"], monthly_budget_microusd=1)

        with pytest.raises(BudgetExhausted):
            await ask(tdb, org, agent)
        assert online.requests == []


class TestBurstPass:
    """``admit_burst``: a request's calls counted in advance, with the caller's own limits, in one
    Redis request; each call given the pass skips its own count."""

    @staticmethod
    def burst_count(direct_redis: redis.Redis, org_id: uuid.UUID) -> int:
        return counted_hits(direct_redis, f"hh:rl:{BURST_BUCKET}:{org_id}:*")

    async def test_calls_with_a_pass_are_counted_once_in_advance_and_not_again(
        self,
        online: FakeOpenAI,
        tdb: TransactionDatabase,
        org: dict[str, Any],
        agent: dict[str, Any],
        direct_redis: redis.Redis,
    ) -> None:
        decisions, burst_pass = await admit_burst(org_id=org["id"], burst_per_minute=10, calls=2, request_id="req-pass")
        assert decisions == []
        assert burst_pass is not None
        assert self.burst_count(direct_redis, org["id"]) == 2

        await ask(tdb, org, agent, burst_per_minute=10, burst_pass=burst_pass)
        await ask(tdb, org, agent, burst_per_minute=10, burst_pass=burst_pass)
        assert self.burst_count(direct_redis, org["id"]) == 2, "the pass's calls were already counted"

        await ask(tdb, org, agent, burst_per_minute=10, burst_pass=burst_pass)
        assert self.burst_count(direct_redis, org["id"]) == 3, "a used-up pass counts the call as usual"
        assert len(online.requests) == 3

    @pytest.mark.usefixtures("online")
    async def test_a_pass_is_good_only_for_its_own_organization(
        self, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], direct_redis: redis.Redis
    ) -> None:
        other = await create_org(db)
        try:
            _, burst_pass = await admit_burst(org_id=org["id"], burst_per_minute=10, calls=1, request_id="req-own")
            assert burst_pass is not None
            await ask(tdb, other, None, burst_per_minute=1, burst_pass=burst_pass)
            with pytest.raises(RateLimited):
                await ask(tdb, other, None, burst_per_minute=1, burst_pass=burst_pass)
            assert burst_pass.calls_left == 1, "the other organization's calls did not use it"
        finally:
            _forget_burst_counts(direct_redis, other["id"])

    async def test_the_burst_limit_refuses_a_request_whose_calls_do_not_fit(
        self, org: dict[str, Any], direct_redis: redis.Redis, log_lines: list[str]
    ) -> None:
        _, first = await admit_burst(org_id=org["id"], burst_per_minute=3, calls=2, request_id="req-a")
        assert first is not None

        with pytest.raises(RateLimited) as raised:
            await admit_burst(org_id=org["id"], burst_per_minute=3, calls=2, request_id="req-b")

        assert 1 <= raised.value.retry_after_seconds <= 60
        assert self.burst_count(direct_redis, org["id"]) == 3, (
            "the call that fitted is used up: fewer calls, never more"
        )
        refused = [json.loads(line) for line in log_lines if "burst-limited" in line]
        assert [(r["request_id"], r["org_id"]) for r in refused] == [("req-b", str(org["id"]))]

    async def test_the_callers_own_refused_limit_comes_first_and_gets_no_pass(
        self, org: dict[str, Any], direct_redis: redis.Redis
    ) -> None:
        own = LimitCheck(RateLimitRule(f"test-own-{uuid.uuid4().hex[:12]}", 1, 3600), "agent-1")
        try:
            (allowed,), granted = await admit_burst(
                org_id=org["id"], burst_per_minute=10, calls=1, request_id="req-1", preceded_by=[own]
            )
            (refused,), withheld = await admit_burst(
                org_id=org["id"], burst_per_minute=10, calls=1, request_id="req-2", preceded_by=[own]
            )
        finally:
            forget_keys(direct_redis, f"{bucket_prefix(own.rule.bucket)}:*")

        assert (allowed.allowed, granted is not None) == (True, True)
        assert (refused.allowed, withheld) == (False, None)
        assert refused.retry_after >= 1
        assert self.burst_count(direct_redis, org["id"]) == 2, "both limits are counted in the one request"

    async def test_a_pass_never_covers_more_calls_than_the_limit_admits(self, org: dict[str, Any]) -> None:
        _, burst_pass = await admit_burst(org_id=org["id"], burst_per_minute=1, calls=2, request_id="req-x")
        assert burst_pass is not None
        assert burst_pass.calls_left == 1


class TestBudget:
    async def test_an_exhausted_budget_refuses_before_any_network_call_and_records_the_refusal(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await set_limits(db, org["id"], monthly_budget_microusd=100)

        with pytest.raises(BudgetExhausted) as raised:
            await ask(tdb, org, agent, request_id="req-broke")

        assert raised.value.status == 402
        assert online.requests == [], "no model call was made"
        [row] = await usage_rows(db, org["id"])
        assert (row["outcome"], row["cost_microusd"], row["prompt_tokens"], row["request_id"]) == (
            "rejected",
            0,
            0,
            "req-broke",
        )
        assert await reservations(db, org["id"]) == []

    async def test_a_call_the_room_cannot_cover_whole_is_sent_with_the_reply_allowance_the_room_pays_for(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.reply.prompt_tokens = None  # no usage: each call is charged its whole hold
        await ask(tdb, org, agent)
        [first] = await usage_rows(db, org["id"])
        hold, prompt_bound = first["cost_microusd"], first["prompt_tokens"]
        floor = cost_microusd("gpt-4o-mini", prompt_tokens=prompt_bound, completion_tokens=MIN_COMPLETION_TOKENS)
        room = floor + (hold - floor) // 2
        await set_limits(db, org["id"], monthly_budget_microusd=hold + room)

        await ask(tdb, org, agent)
        with pytest.raises(BudgetExhausted):
            await ask(tdb, org, agent)

        first_request, second_request = online.requests_to("/v1/chat/completions")
        allowed = second_request.body["max_completion_tokens"]
        assert first_request.body["max_completion_tokens"] == 400
        assert MIN_COMPLETION_TOKENS <= allowed < 400
        assert cost_microusd("gpt-4o-mini", prompt_tokens=prompt_bound, completion_tokens=allowed) <= room
        assert cost_microusd("gpt-4o-mini", prompt_tokens=prompt_bound, completion_tokens=allowed + 1) > room
        _, second, refused = await usage_rows(db, org["id"])
        assert (second["completion_tokens"], refused["outcome"]) == (allowed, "rejected")
        first_hold, second_hold = await reservations(db, org["id"])
        assert (first_hold["amount_microusd"], second_hold["amount_microusd"]) == (hold, room)
        period = await budget_period(db, org["id"])
        assert period is not None
        assert period["spent_microusd"] <= hold + room

    async def test_usage_reported_above_the_hold_is_charged_as_reported_and_logged(
        self,
        online: FakeOpenAI,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
        log_lines: list[str],
    ) -> None:
        online.reply.prompt_tokens, online.reply.completion_tokens = 100, 5000  # the call allowed 400

        result = await ask(tdb, org, agent, request_id="req-over")

        [hold] = await reservations(db, org["id"])
        assert result.cost_microusd == cost_microusd("gpt-4o-mini", prompt_tokens=100, completion_tokens=5000)
        assert hold["actual_microusd"] == result.cost_microusd > hold["amount_microusd"], "what the provider bills"
        [over] = [json.loads(line) for line in log_lines if "usage-above-hold" in line]
        assert (over["request_id"], over["completion_count"], over["level"]) == ("req-over", 5000, "warning")

    async def test_a_call_with_no_room_only_because_of_holds_in_flight_waits_for_them_to_settle(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await ask(tdb, org, agent)
        [probe] = await reservations(db, org["id"])
        hold, spent = probe["amount_microusd"], probe["actual_microusd"]
        await set_limits(db, org["id"], monthly_budget_microusd=spent + hold + 10)
        online.reset()
        online.delay_seconds = 0.5

        first = asyncio.ensure_future(ask(tdb, org, agent))
        assert await asyncio.to_thread(online.request_arrived.wait, 5)
        second = await ask(tdb, org, agent)  # no room while the first call's hold is held
        assert (await first).usage_event_id < second.usage_event_id

        _, first_hold, second_hold = await reservations(db, org["id"])
        assert second_hold["created_at"] >= first_hold["finished_at"], "reserved once the first hold settled"
        assert len(online.requests) == 2

    async def test_an_unknown_model_is_refused_before_anything_is_reserved_or_called(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        with pytest.raises(UnknownModel) as raised:
            await ask(tdb, org, agent, model="gpt-9-turbo")

        assert "gpt-9-turbo" in raised.value.detail
        assert "gpt-4o-mini" in raised.value.detail, "the error names the supported models"
        assert online.requests == []
        assert await usage_rows(db, org["id"]) == []
        assert await reservations(db, org["id"]) == []


@pytest.mark.usefixtures("gateway")
class TestOffline:
    async def test_without_a_key_the_answer_quotes_the_knowledge_and_is_metered_as_offline(
        self, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        result = await ask(tdb, org, agent, "How long do refunds take?", knowledge=[REFUNDS])

        assert result.offline is True
        assert result.model == "offline"
        assert result.content.startswith(EXCERPT_INTRO)
        assert "Refunds go back to the original card within five days." in result.content
        assert "https://acme.example/refunds" in result.content
        assert result.tool_calls == []
        assert result.cost_microusd == 0
        assert result.prompt_tokens == sum(
            len(m.content.split()) for m in conversation("How long do refunds take?")
        ) + (len(REFUNDS.content.split()))
        assert result.completion_tokens == len(result.content.split())
        [row] = await usage_rows(db, org["id"])
        assert (row["model"], row["outcome"], row["cost_microusd"], row["id"]) == (
            "offline",
            "ok",
            0,
            result.usage_event_id,
        )
        [reservation] = await reservations(db, org["id"])
        assert (reservation["status"], reservation["actual_microusd"]) == ("settled", 0)

    async def test_with_nothing_retrieved_it_offers_to_pass_the_question_on(
        self, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        result = await ask(tdb, org, agent, "Do you sell unicycles?", knowledge=[])

        assert result.content == NO_MATCH_REPLY
        assert result.tool_calls == []

    @pytest.mark.parametrize(
        "text",
        ["Can I talk to a human?", "I want to speak with an agent please", "Is there a real person there?"],
    )
    async def test_asking_for_a_person_escalates(
        self, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any], text: str
    ) -> None:
        result = await ask(tdb, org, agent, text, knowledge=[REFUNDS])

        [call] = result.tool_calls
        assert call.name == ESCALATE
        assert call.arguments["reason"] == "visitor_requested_human"
        assert call.arguments["summary"] == text
        assert call.arguments["draft_reply"].startswith(EXCERPT_INTRO), "the team gets a draft from the excerpts"
        assert "person on the team" in result.content

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "My name is Dana Smith, email dana.smith@example.com",
                {"email": "dana.smith@example.com", "phone": None, "name": "Dana Smith"},
            ),
            ("call me on +44 20 7946 0958 tomorrow", {"email": None, "phone": "+44 20 7946 0958", "name": None}),
            ("I'm Lee: lee@shop.example / (555) 010-4477", {"email": "lee@shop.example", "phone": "(555) 010-4477"}),
        ],
    )
    async def test_contact_details_are_captured_as_a_lead(
        self,
        tdb: TransactionDatabase,
        org: dict[str, Any],
        agent: dict[str, Any],
        text: str,
        expected: dict[str, Any],
    ) -> None:
        result = await ask(tdb, org, agent, text)

        [call] = result.tool_calls
        assert call.name == CAPTURE_LEAD
        assert set(call.arguments) == {"email", "phone", "name", "note"}
        assert {k: call.arguments[k] for k in expected} == expected
        assert call.arguments["note"] == text

    async def test_a_date_or_an_order_number_is_not_a_phone_number(
        self, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        result = await ask(tdb, org, agent, "My order 12345 from 2025-03-14 has not arrived")
        assert result.tool_calls == []

    async def test_intents_become_tool_calls_only_for_offered_tools(
        self, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        result = await ask(tdb, org, agent, "human please, I'm at a@b.example", tools=None)
        assert result.tool_calls == []

    async def test_the_offline_provider_still_honours_the_budget(
        self, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await set_limits(db, org["id"], monthly_budget_microusd=0)
        with pytest.raises(BudgetExhausted):
            await ask(tdb, org, agent)

    async def test_embeddings_are_none_and_nothing_is_metered(
        self, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        vectors = await embed(tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["a page"], request_id="r")
        assert vectors is None
        assert await usage_rows(db, org["id"]) == []


class TestEmbeddings:
    async def test_vectors_come_back_in_order_and_the_call_is_metered(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        scan_id = uuid.uuid4()
        online.vectors = {"second page": [1.0] + [0.0] * 1535}
        texts = ["first page text here", "second page"]

        vectors = await embed(
            tdb, org_id=org["id"], agent_id=agent["id"], scan_id=scan_id, texts=texts, request_id="req-embed"
        )

        assert vectors is not None
        assert [len(v) for v in vectors] == [1536, 1536]
        assert vectors[1][:2] == [1.0, 0.0]
        [request] = online.requests_to("/v1/embeddings")
        assert request.body["model"] == "text-embedding-3-small"
        assert request.body["input"] == texts
        [row] = await usage_rows(db, org["id"])
        assert (row["kind"], row["model"], row["scan_id"], row["agent_id"], row["outcome"]) == (
            "embedding",
            "text-embedding-3-small",
            scan_id,
            agent["id"],
            "ok",
        )
        assert (row["prompt_tokens"], row["completion_tokens"]) == (6, 0)
        assert row["cost_microusd"] == cost_microusd("text-embedding-3-small", prompt_tokens=6, completion_tokens=0)
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "settled"

    async def test_vectors_of_the_wrong_size_are_an_error(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        online.embedding_dimensions = 768
        with pytest.raises(ModelUnavailable):
            await embed(tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["x y"], request_id="r")
        [row] = await usage_rows(db, org["id"])
        assert (row["kind"], row["outcome"], row["cost_microusd"]) == ("embedding", "error", 0)

    @pytest.mark.parametrize(
        "body",
        [
            {"data": [{"index": 0, "embedding": "not base64!"}], "usage": {"prompt_tokens": 1}},
            {"data": [{"index": 0, "embedding": "AAAA"}], "usage": {"prompt_tokens": 1}},  # 3 bytes
            {"data": [{"index": 0, "embedding": [0.1, 0.2]}]},
            {"data": "nothing"},
            {"object": "list"},
        ],
    )
    async def test_a_malformed_answer_is_an_error_and_costs_nothing(
        self, body: dict[str, Any], online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        online.raw_body = body
        with pytest.raises(ModelUnavailable):
            await embed(tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["x y"], request_id="r")
        [row] = await usage_rows(db, org["id"])
        assert (row["kind"], row["outcome"], row["cost_microusd"]) == ("embedding", "error", 0)

    async def test_nothing_to_embed_makes_no_call(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        assert await embed(tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=[], request_id="r") == []
        assert online.requests == []
        assert await usage_rows(db, org["id"]) == []


class TestEmbedThen:
    """The caller's next step runs on the vectors while the usage row is written."""

    async def test_the_next_step_gets_the_vectors_and_the_call_is_metered_when_it_returns(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        seen: list[list[list[float]] | None] = []

        async def then(vectors: list[list[float]] | None) -> str:
            seen.append(vectors)
            return "searched"

        result = await embed_then(
            tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["a question"], request_id="r", then=then
        )

        assert result == "searched"
        [vectors] = seen
        assert vectors is not None
        assert [len(vector) for vector in vectors] == [1536]
        [row] = await usage_rows(db, org["id"])
        assert (row["kind"], row["outcome"]) == ("embedding", "ok")
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "settled"

    async def test_a_failing_next_step_still_leaves_the_call_metered(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        async def then(vectors: list[list[float]] | None) -> None:
            raise RuntimeError("the search failed")

        with pytest.raises(RuntimeError, match="the search failed"):
            await embed_then(
                tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["a question"], request_id="r", then=then
            )

        [row] = await usage_rows(db, org["id"])
        assert (row["kind"], row["outcome"], row["cost_microusd"] > 0) == ("embedding", "ok", True)
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "settled"

    async def test_a_caller_that_goes_away_during_the_next_step_still_leaves_the_call_metered(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        # The visitor disconnects while the search runs: the task is cancelled, the usage row is not.
        searching = asyncio.Event()

        async def then(vectors: list[list[float]] | None) -> None:
            searching.set()
            await asyncio.Event().wait()

        turn = asyncio.create_task(
            embed_then(
                tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["a question"], request_id="r", then=then
            )
        )
        await searching.wait()
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn

        [row] = await usage_rows(db, org["id"])
        assert (row["kind"], row["outcome"], row["cost_microusd"] > 0) == ("embedding", "ok", True)
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "settled"

    async def test_a_failed_call_never_reaches_the_next_step(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        online.embedding_dimensions = 768
        called: list[object] = []

        async def then(vectors: list[list[float]] | None) -> None:
            called.append(vectors)

        with pytest.raises(ModelUnavailable):
            await embed_then(
                tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["x y"], request_id="r", then=then
            )
        assert called == []
        [row] = await usage_rows(db, org["id"])
        assert (row["outcome"], row["cost_microusd"]) == ("error", 0)

    async def test_offline_the_next_step_gets_none_and_nothing_is_metered(
        self, gateway: Configure, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        seen: list[object] = []

        async def then(vectors: list[list[float]] | None) -> int:
            seen.append(vectors)
            return 7

        assert (
            await embed_then(tdb, org_id=org["id"], agent_id=None, scan_id=None, texts=["q"], request_id="r", then=then)
            == 7
        )
        assert seen == [None]
        assert await usage_rows(db, org["id"]) == []


class TestConcurrency:
    CALLS = 200
    ROOM_FOR = 50

    @pytest.mark.usefixtures("committed_db")
    async def test_simultaneous_calls_never_spend_past_the_budget_and_each_is_metered_once(
        self, online: FakeOpenAI, gateway: Configure, admin_url: str, direct_redis: redis.Redis
    ) -> None:
        # 200 calls queue for five pooled connections and one organization's row lock; on a busy
        # machine that can pass the pool's 3 s default, which is a pool figure, not a budget one.
        gateway(DB_CONNECT_TIMEOUT_SECONDS="30")
        # Every answer costs 100 * 0.15 + 400 * 0.60 = 255 micro-dollars: about half of what a call reserves.
        online.reply.prompt_tokens, online.reply.completion_tokens = 100, 400
        database = get_database()
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            probe_org, org = await create_org(admin), await create_org(admin)
            await set_limits(admin, org["id"], burst_per_minute=10 * self.CALLS)
            try:
                await ask(database, probe_org, None)
                [probe] = await reservations(admin, probe_org["id"])
                hold = probe["amount_microusd"]
                budget = self.ROOM_FOR * hold
                await set_limits(admin, org["id"], monthly_budget_microusd=budget)
                online.requests.clear()

                outcomes = await asyncio.gather(
                    *(ask(database, org, None, request_id=f"req-{i}") for i in range(self.CALLS)),
                    return_exceptions=True,
                )

                results = [o for o in outcomes if isinstance(o, ChatResult)]
                refusals = [o for o in outcomes if isinstance(o, BudgetExhausted)]
                others = [o for o in outcomes if not isinstance(o, ChatResult | BudgetExhausted)]
                assert others == [], f"only budget refusals are expected, got {others[:3]!r}"
                assert len(results) + len(refusals) == self.CALLS
                assert self.ROOM_FOR <= len(results) < self.CALLS, "room for 50 holds admits at least 50 calls"
                assert refusals, "the budget ran out"

                period = await budget_period(admin, org["id"])
                assert period is not None
                assert period["spent_microusd"] <= budget
                assert period["reserved_microusd"] == 0
                assert period["spent_microusd"] == sum(r.cost_microusd for r in results) == 255 * len(results)

                rows = await usage_rows(admin, org["id"])
                ok_rows = [r for r in rows if r["outcome"] == "ok"]
                assert sorted(r["id"] for r in ok_rows) == sorted(r.usage_event_id for r in results)
                assert sum(r["outcome"] == "rejected" for r in rows) == len(refusals)
                assert len(rows) == self.CALLS, "every call metered exactly once"
                assert len(online.requests) == len(results), "no refused call reached the provider"
                holds = await reservations(admin, org["id"])
                assert [h["status"] for h in holds] == ["settled"] * len(results)
            finally:
                _forget_burst_counts(direct_redis, org["id"])
                _forget_burst_counts(direct_redis, probe_org["id"])
