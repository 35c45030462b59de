"""Streamed widget replies (``Accept: text/event-stream``) through the deployed function, served by
uvicorn on loopback so events really cross a socket as they are written; Postgres and Redis are
real, and the model is the loopback server streaming as OpenAI does.

The fixtures are the JSON path's own, imported (hence F811: pytest injects them by name).
"""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from shared.gateway import CAPTURE_LEAD, ESCALATE
from shared.web.deps import get_request_database
from shared.widget.service import HANDED_OVER_REPLY, MODEL_FAILURE_REPLY
from shared.widget.streaming import wants_event_stream
from tests.conftest import Connection, TransactionDatabase
from tests.fakes.openai_server import FakeOpenAI
from tests.functions.test_widget_chat import (  # noqa: F401
    ORIGIN,
    OTHER_ORIGIN,
    Widget,
    app,
    client,
    configure,
    fake_openai,
    forget_rate_limits,
    make_widget,
    online,
    rows,
    send,
    set_limits,
    without_request_id,
)

REPLY = "We are open Monday to Saturday from nine to six, and closed on Sundays."
SSE_HEADERS = {"Accept": "text/event-stream", "Origin": ORIGIN}


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    at: float


@dataclass
class Stream:
    status: int
    headers: httpx.Headers
    events: list[Event] = field(default_factory=list)
    comments: int = 0

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.named("delta"))


@pytest.fixture
async def served(app: FastAPI, db: Connection, configure: Any) -> AsyncIterator[str]:
    """The function under uvicorn on a loopback port, in this test's event loop and transaction."""
    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    task = asyncio.ensure_future(server.serve(sockets=[listener]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        app.dependency_overrides.clear()


async def stream(
    base_url: str,
    widget: Widget,
    message: str = "What are your opening hours?",
    *,
    token: str | None = None,
    stop_after_deltas: int | None = None,
) -> Stream:
    """POST a message asking for a stream; read events as they arrive (or stop after some deltas)."""
    headers = dict(SSE_HEADERS)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as http,
        http.stream("POST", widget.chat_path, json={"message": message}, headers=headers) as response,
    ):
        result = Stream(response.status_code, response.headers)
        if response.headers.get("content-type", "").startswith("application/problem+json"):
            await response.aread()
            result.events.append(Event("problem", response.json(), time.perf_counter()))
            return result
        name = None
        async for line in response.aiter_lines():
            if line.startswith(":"):
                result.comments += 1
            elif line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None, "every data line follows its event line"
                result.events.append(Event(name, json.loads(line.removeprefix("data: ")), time.perf_counter()))
                name = None
                if stop_after_deltas is not None and len(result.named("delta")) >= stop_after_deltas:
                    return result  # the visitor closes the tab
    return result


async def request_finished(log_lines: list[str], count: int = 1) -> None:
    """Wait for the function's request log line(s): written once the response, settlement included, is done."""
    async with asyncio.timeout(10):
        while sum(1 for line in log_lines if json.loads(line).get("message") == "request") < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def usage(db: Connection, org_id: uuid.UUID) -> list[dict[str, Any]]:
    return await rows(db, "select * from public.usage_events where org_id = %s order by id", org_id)


async def messages(db: Connection, org_id: uuid.UUID) -> list[dict[str, Any]]:
    return await rows(db, "select * from public.messages where org_id = %s order by id", org_id)


async def held(db: Connection, org_id: uuid.UUID) -> int:
    found = await rows(
        db, "select count(*) as n from public.budget_reservations where org_id = %s and status = 'held'", org_id
    )
    return int(found[0]["n"])


# -- the contract -------------------------------------------------------------------------------------


class TestEventStream:
    async def test_events_arrive_as_the_model_writes_them_and_end_with_done(
        self, served: str, online: FakeOpenAI, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        online.reply.content = REPLY
        online.token_interval_seconds = 0.1
        widget = await make_widget()

        result = await stream(served, widget)

        assert result.status == 200
        assert result.headers["content-type"].startswith("text/event-stream")
        assert result.headers["cache-control"] == "no-store"
        assert result.headers["access-control-allow-origin"] == ORIGIN
        assert result.headers["x-request-id"].startswith("req_")
        names = [e.name for e in result.events]
        assert names[0] == "conversation"
        assert names[-1] == "done"
        assert set(names[1:-1]) == {"delta"}
        assert result.text == REPLY
        deltas = result.named("delta")
        assert len(deltas) == len(REPLY.split())
        span = result.events[-1].at - deltas[0].at
        assert span > 0.1 * (len(deltas) - 2), "the first words arrived well before the last"
        assert result.events[-1].data == {"status": "answered"}

        await request_finished(log_lines)
        [row] = await usage(db, widget.org["id"])
        assert row["outcome"] == "ok"
        assert [
            (m["role"], m["content"], m["partial"], m["usage_event_id"]) for m in await messages(db, widget.org["id"])
        ] == [
            ("visitor", "What are your opening hours?", False, None),
            ("agent", REPLY, False, row["id"]),
        ]
        assert await held(db, widget.org["id"]) == 0

    async def test_the_token_in_the_first_event_continues_the_conversation(
        self, served: str, online: FakeOpenAI, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        widget = await make_widget()
        first = await stream(served, widget)
        conversation = first.named("conversation")[0].data
        assert set(conversation) == {"conversation_id", "visitor_token", "visitor_token_expires_at"}

        second = await stream(served, widget, "And on Sundays?", token=conversation["visitor_token"])

        assert second.named("conversation")[0].data["conversation_id"] == conversation["conversation_id"]
        await request_finished(log_lines, 2)
        conversations = await rows(
            db, "select id, message_count from public.conversations where agent_id = %s", widget.agent["id"]
        )
        assert [(str(c["id"]), c["message_count"]) for c in conversations] == [(conversation["conversation_id"], 4)]

    async def test_without_accept_event_stream_the_answer_is_todays_json(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        response = await send(client, widget)
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {
            "conversation_id",
            "visitor_token",
            "visitor_token_expires_at",
            "reply",
            "status",
        }

    def test_accept_is_read_as_media_ranges(self) -> None:
        assert wants_event_stream("text/event-stream")
        assert wants_event_stream("application/json, Text/Event-Stream; charset=utf-8")
        assert not wants_event_stream("text/event-stream;q=0")
        assert not wants_event_stream("application/json")
        assert not wants_event_stream(None)
        assert not wants_event_stream("text/event-streams")


class TestRefusalsBeforeTheStream:
    async def test_each_refusal_is_the_same_problem_as_on_the_json_path(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        busy = await make_widget()
        await set_limits(db, busy.org["id"], widget_rpm_per_visitor=1)
        broke = await make_widget()
        await set_limits(db, broke.org["id"], monthly_budget_microusd=0)
        cases: list[tuple[str, dict[str, Any], dict[str, str]]] = [
            (f"/api/widget/hh_wk_{'0' * 48}/chat", {"message": "hi"}, {"Origin": ORIGIN}),
            (widget.chat_path, {"message": "hi"}, {"Origin": OTHER_ORIGIN}),
            (widget.chat_path, {"message": ""}, {"Origin": ORIGIN}),
            (widget.chat_path, {"message": "hi", "conversation_id": str(uuid.uuid4())}, {"Origin": ORIGIN}),
            (widget.chat_path, {"message": "hi"}, {"Origin": ORIGIN, "Authorization": "Bearer hh_vt_forged"}),
            (broke.chat_path, {"message": "hi"}, {"Origin": ORIGIN}),
        ]
        for path, body, headers in cases:
            as_json = await client.post(path, json=body, headers=headers)
            as_stream = await client.post(path, json=body, headers={**headers, "Accept": "text/event-stream"})
            assert as_stream.status_code == as_json.status_code >= 400, path
            assert without_request_id(as_stream) == without_request_id(as_json)
            differing = {"x-request-id", "content-length"}
            assert {k: v for k, v in as_stream.headers.items() if k not in differing} == {
                k: v for k, v in as_json.headers.items() if k not in differing
            }

        await client.post(busy.chat_path, json={"message": "hi"}, headers={"Origin": ORIGIN, "X-Real-IP": "192.0.2.1"})
        limited = await client.post(
            busy.chat_path,
            json={"message": "hi"},
            headers={"Origin": ORIGIN, "X-Real-IP": "192.0.2.1", "Accept": "text/event-stream"},
        )
        assert limited.status_code == 429
        assert limited.headers["retry-after"]
        assert limited.headers["access-control-allow-origin"] == ORIGIN


# -- endings ------------------------------------------------------------------------------------------


class TestVisitorLeaves:
    async def test_the_call_is_settled_and_metered_and_the_partial_reply_stored_as_such(
        self, served: str, online: FakeOpenAI, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        online.reply.content = REPLY
        online.token_interval_seconds = 0.2
        widget = await make_widget()

        result = await stream(served, widget, stop_after_deltas=2)
        await request_finished(log_lines)

        assert await asyncio.to_thread(online.stream_closed.wait, 5), "the model was stopped"
        [row] = await usage(db, widget.org["id"])
        assert (row["outcome"], row["estimated"]) == ("cancelled", True), "charged at its bound, as an estimate"
        assert row["cost_microusd"] > 0
        assert await held(db, widget.org["id"]) == 0, "the reservation was settled at once, not left to expire"
        [visitor, reply] = await messages(db, widget.org["id"])
        assert visitor["role"] == "visitor"
        assert (reply["role"], reply["partial"], reply["usage_event_id"]) == ("agent", True, row["id"])
        assert reply["content"].startswith(result.text)
        assert REPLY.startswith(reply["content"])
        assert reply["content"] != REPLY
        assert await rows(db, "select * from public.review_items where org_id = %s", widget.org["id"]) == []


class TestModelFailsMidStream:
    async def test_the_visitor_gets_our_closing_line_and_the_team_an_escalation(
        self, served: str, online: FakeOpenAI, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        online.reply.content = REPLY
        online.stream_fail_after = 3
        widget = await make_widget()

        result = await stream(served, widget)

        assert [e.name for e in result.events] == ["conversation", "delta", "delta", "delta", "error", "done"]
        assert result.named("error")[0].data == {"message": MODEL_FAILURE_REPLY}
        assert result.events[-1].data == {"status": "handed_to_team"}
        assert "server had an error" not in json.dumps([e.data for e in result.events])
        await request_finished(log_lines)
        [row] = await usage(db, widget.org["id"])
        assert (row["outcome"], row["estimated"]) == ("error", True)
        [_, reply] = await messages(db, widget.org["id"])
        assert (reply["content"], reply["partial"], reply["usage_event_id"]) == (result.text, True, row["id"])
        [item] = await rows(db, "select * from public.review_items where org_id = %s", widget.org["id"])
        assert (item["kind"], item["status"], item["payload"]["reason"]) == (
            "escalation",
            "pending",
            "model_unavailable",
        )
        [conversation] = await rows(
            db, "select status from public.conversations where agent_id = %s", widget.agent["id"]
        )
        assert conversation["status"] == "escalated"

    async def test_a_stall_is_a_timeout_with_the_same_closing_line(
        self,
        served: str,
        online: FakeOpenAI,
        configure: Any,
        db: Connection,
        make_widget: Callable[..., Any],
        log_lines: list[str],
    ) -> None:
        configure(MODEL_TIMEOUT_SECONDS="0.5")
        online.reply.content = REPLY
        online.stream_stall_after = 1
        widget = await make_widget()

        result = await stream(served, widget)

        assert [e.name for e in result.events] == ["conversation", "delta", "error", "done"]
        await request_finished(log_lines)
        [row] = await usage(db, widget.org["id"])
        assert row["outcome"] == "timeout"

    async def test_a_model_refusing_before_its_first_word_gives_the_closing_line_and_no_partial_reply(
        self, served: str, online: FakeOpenAI, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        online.fail_status = 500
        widget = await make_widget()

        result = await stream(served, widget)

        assert [e.name for e in result.events] == ["conversation", "error", "done"]
        await request_finished(log_lines)
        [_, reply] = await messages(db, widget.org["id"])
        assert (reply["role"], reply["content"], reply["partial"]) == ("system", MODEL_FAILURE_REPLY, False)


class TestToolCallsInTheStream:
    async def test_escalations_and_leads_reach_the_review_queue_and_the_widget(
        self, served: str, online: FakeOpenAI, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        online.reply.content = None
        online.reply.tool_calls = [
            (ESCALATE, {"reason": "visitor_requested_human", "summary": "Wants a person", "draft_reply": "Hi"}),
            (CAPTURE_LEAD, {"email": "ana@example.com", "phone": None, "name": "Ana", "note": None}),
        ]
        widget = await make_widget()

        result = await stream(served, widget, "A person please, ana@example.com")

        assert [e.name for e in result.events] == ["conversation", "delta", "tool", "tool", "done"]
        assert result.text == HANDED_OVER_REPLY
        assert [e.data["kind"] for e in result.named("tool")] == ["handed_to_team", "lead_captured"]
        assert result.events[-1].data == {"status": "handed_to_team"}
        await request_finished(log_lines)
        items = await rows(
            db, "select kind, status from public.review_items where org_id = %s order by id", widget.org["id"]
        )
        assert sorted((i["kind"], i["status"]) for i in items) == [("escalation", "pending"), ("lead", "pending")]


class TestOffline:
    async def test_the_offline_provider_streams_too(
        self, served: str, db: Connection, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        widget = await make_widget()

        result = await stream(served, widget, "Can I talk to a person?")

        assert len(result.named("delta")) > 5
        assert [e.data["kind"] for e in result.named("tool")] == ["handed_to_team"]
        assert result.events[-1].data == {"status": "handed_to_team"}
        await request_finished(log_lines)
        [row] = await usage(db, widget.org["id"])
        assert (row["model"], row["outcome"]) == ("offline", "ok")
