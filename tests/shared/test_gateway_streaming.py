"""Streamed chat calls through the gateway, against the real Postgres and Redis, with the provider a
loopback server that streams as OpenAI does (tests/fakes/openai_server.py).

The fixtures are the non-streamed tests' own, imported (hence F811: pytest injects them by name).
"""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from shared.errors import BudgetExhausted
from shared.gateway import CAPTURE_LEAD, ESCALATE, WIDGET_TOOLS, ChatStream, StreamedChat, open_chat_stream
from shared.pricing import cost_microusd
from tests.conftest import Connection, TransactionDatabase
from tests.fakes.openai_server import FakeOpenAI
from tests.shared.test_gateway import (  # noqa: F401 - fixtures shared with the non-streamed tests
    agent,
    configure,
    conversation,
    fake_openai,
    gateway,
    online,
    org,
    reservations,
    set_limits,
    tdb,
    usage_rows,
)

REPLY = "Refunds go back to the original card within five days of the return."


async def open_stream(
    database: Any, org: dict[str, Any], agent: dict[str, Any], text: str = "Refunds?", **overrides: Any
) -> ChatStream:
    arguments: dict[str, Any] = {
        "org_id": org["id"],
        "agent_id": agent["id"],
        "conversation_id": None,
        "model": "gpt-4o-mini",
        "messages": conversation(text),
        "tools": WIDGET_TOOLS,
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        **overrides,
    }
    return await open_chat_stream(database, **arguments)


async def read_all(stream: ChatStream) -> tuple[list[str], StreamedChat]:
    pieces = [piece async for piece in stream.deltas()]
    return pieces, await stream.finish()


class TestStreamedCalls:
    async def test_text_arrives_in_pieces_and_the_usage_chunk_meters_the_call(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.reply.content = REPLY
        online.reply.prompt_tokens, online.reply.completion_tokens = 1234, 56

        pieces, result = await read_all(await open_stream(tdb, org, agent, request_id="req-streamed"))

        assert len(pieces) == len(REPLY.split()), "one piece per chunk the model sent"
        assert "".join(pieces) == REPLY == result.content
        [request] = online.requests_to("/v1/chat/completions")
        assert request.body["stream"] is True
        assert request.body["stream_options"] == {"include_usage": True}
        [row] = await usage_rows(db, org["id"])
        assert request.headers["x-client-request-id"] == row["client_request_id"], "each call has its own id"
        assert row["provider_request_id"] == online.answered_ids[-1]
        cost = cost_microusd("gpt-4o-mini", prompt_tokens=1234, completion_tokens=56)
        assert (result.ending, result.outcome, result.cost_microusd, result.estimated) == (
            "finished",
            "ok",
            cost,
            False,
        )
        assert row["estimated"] is False
        assert (row["id"], row["outcome"], row["prompt_tokens"], row["completion_tokens"], row["cost_microusd"]) == (
            result.usage_event_id,
            "ok",
            1234,
            56,
            cost,
        )
        assert row["request_id"] == "req-streamed"
        [reservation] = await reservations(db, org["id"])
        assert (reservation["status"], reservation["actual_microusd"]) == ("settled", cost)

    async def test_nothing_is_sent_to_the_model_before_the_deltas_are_read(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        stream = await open_stream(tdb, org, agent)
        assert online.requests == []
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "held", "the hold is committed before the call"
        await read_all(stream)
        assert len(online.requests) == 1

    async def test_a_stream_without_usage_is_metered_at_the_reserved_bound(
        self,
        online: FakeOpenAI,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
        log_lines: list[str],
    ) -> None:
        online.reply.content = REPLY
        online.reply.prompt_tokens = None

        _, result = await read_all(await open_stream(tdb, org, agent, max_tokens=300))

        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert row["completion_tokens"] == 300, "the completion bound the provider enforces"
        assert row["cost_microusd"] == reservation["amount_microusd"] == result.cost_microusd
        assert (row["outcome"], row["estimated"]) == ("ok", True), "the row says the cost is an estimate"
        assert reservation["status"] == "settled"
        assert any(json.loads(line).get("decision_reason") == "usage-missing" for line in log_lines)

    async def test_tool_calls_in_the_stream_come_back_parsed_and_only_offered_tools_pass(
        self, online: FakeOpenAI, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        escalation = {"reason": "visitor_requested_human", "summary": "Wants a person", "draft_reply": "Hello"}
        lead = {"email": "ana@example.com", "phone": None, "name": "Ana", "note": None}
        online.reply.content = None
        online.reply.tool_calls = [(ESCALATE, escalation), ("delete_everything", {}), (CAPTURE_LEAD, lead)]

        pieces, result = await read_all(await open_stream(tdb, org, agent))

        assert pieces == []
        assert [(call.name, call.arguments) for call in result.tool_calls] == [
            (ESCALATE, escalation),
            (CAPTURE_LEAD, lead),
        ]

    async def test_a_model_failing_mid_stream_ends_the_text_and_is_charged_at_its_bound_as_an_estimate(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.reply.content = REPLY
        online.stream_fail_after = 3

        pieces, result = await read_all(await open_stream(tdb, org, agent))

        assert "".join(pieces) == result.content == " ".join(REPLY.split()[:3]) + " "
        assert (result.ending, result.outcome, result.tool_calls) == ("failed", "error", [])
        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert (row["id"], row["outcome"], row["estimated"]) == (result.usage_event_id, "error", True)
        assert row["cost_microusd"] == reservation["amount_microusd"] > 0, "the model wrote words it may bill"
        assert reservation["status"] == "settled"
        assert "server had an error" not in result.content

    async def test_a_model_stalling_mid_stream_is_a_timeout(
        self,
        online: FakeOpenAI,
        configure: Any,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        agent: dict[str, Any],
    ) -> None:
        configure(MODEL_TIMEOUT_SECONDS="0.5")
        online.reply.content = REPLY
        online.stream_stall_after = 2

        pieces, result = await read_all(await open_stream(tdb, org, agent))

        assert len(pieces) == 2
        assert (result.ending, result.outcome) == ("failed", "timeout")
        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert (row["outcome"], row["estimated"], row["cost_microusd"]) == (
            "timeout",
            True,
            reservation["amount_microusd"],
        )
        assert await asyncio.to_thread(online.stream_closed.wait, 5), "the stalled stream was closed"

    async def test_a_refused_request_is_a_failure_with_no_text(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.fail_status = 500

        pieces, result = await read_all(await open_stream(tdb, org, agent))

        assert (pieces, result.ending, result.outcome, result.cost_microusd) == ([], "failed", "error", 0)
        [row] = await usage_rows(db, org["id"])
        assert row["estimated"] is False, "an HTTP error status before the first chunk is not billed"
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "released"


class TestCutShort:
    async def test_a_caller_that_stops_reading_stops_the_model_and_the_call_is_metered_once(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.reply.content = REPLY
        online.token_interval_seconds = 0.2
        stream = await open_stream(tdb, org, agent)
        deltas = stream.deltas()
        first = await anext(deltas)

        result = await stream.finish()
        again = await stream.finish()

        assert result is again
        assert (result.ending, result.content) == ("cut_short", first)
        assert await asyncio.to_thread(online.stream_closed.wait, 5), "the provider's stream was closed"
        [row] = await usage_rows(db, org["id"])
        [reservation] = await reservations(db, org["id"])
        assert (row["id"], row["outcome"], row["estimated"]) == (result.usage_event_id, "cancelled", True)
        assert row["cost_microusd"] == reservation["amount_microusd"], "never metered for less than it may cost"
        assert reservation["status"] == "settled", "settled at once, not left to expire"

    async def test_a_cancelled_reader_is_still_metered_once(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        online.reply.content = REPLY
        online.first_token_seconds = 5
        stream = await open_stream(tdb, org, agent)

        async def reader() -> list[str]:
            return [piece async for piece in stream.deltas()]

        task = asyncio.ensure_future(reader())
        assert await asyncio.to_thread(online.request_arrived.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result = await stream.finish()

        assert (result.ending, result.content) == ("cut_short", "")
        assert await asyncio.to_thread(online.stream_closed.wait, 5)
        [row] = await usage_rows(db, org["id"])
        assert (row["id"], row["outcome"], row["estimated"]) == (result.usage_event_id, "cancelled", True)

    async def test_a_stream_never_read_costs_nothing(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        stream = await open_stream(tdb, org, agent)

        result = await stream.finish()

        assert online.requests == []
        [row] = await usage_rows(db, org["id"])
        assert (row["outcome"], row["estimated"], row["cost_microusd"]) == ("cancelled", False, 0)
        [reservation] = await reservations(db, org["id"])
        assert reservation["status"] == "released"
        assert result.ending == "cut_short"

    async def test_a_stream_is_read_once(
        self, online: FakeOpenAI, tdb: TransactionDatabase, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        stream = await open_stream(tdb, org, agent)
        await read_all(stream)
        with pytest.raises(RuntimeError):
            stream.deltas()


class TestAdmission:
    async def test_an_exhausted_budget_refuses_before_the_stream_with_no_model_call(
        self, online: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        await set_limits(db, org["id"], monthly_budget_microusd=1)

        with pytest.raises(BudgetExhausted):
            await open_stream(tdb, org, agent)

        assert online.requests == []
        assert [row["outcome"] for row in await usage_rows(db, org["id"])] == ["rejected"]


class TestOfflineStreams:
    async def test_the_offline_provider_streams_its_answer_word_by_word(
        self, gateway: Any, tdb: TransactionDatabase, db: Connection, org: dict[str, Any], agent: dict[str, Any]
    ) -> None:
        pieces, result = await read_all(await open_stream(tdb, org, agent, "Can I talk to a human? ana@example.com"))

        assert len(pieces) > 5
        assert "".join(pieces) == result.content
        assert (result.ending, result.outcome, result.offline, result.cost_microusd) == ("finished", "ok", True, 0)
        assert sorted(call.name for call in result.tool_calls) == sorted([ESCALATE, CAPTURE_LEAD])
        [row] = await usage_rows(db, org["id"])
        assert (row["model"], row["outcome"], row["cost_microusd"]) == ("offline", "ok", 0)
