"""The public widget from the attacker's side, through the deployed function and its real dependencies.

Postgres and Redis (behind the Upstash REST bridge) are real; the model provider is the loopback
server of tests/fakes/openai_server.py, reached through the settings exactly as OpenAI is in
production; nothing of ours is patched.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import psycopg
import pytest
import redis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from shared.db.errors import map_db_errors
from shared.db.pool import close_pools
from shared.db.session import as_user
from shared.gateway import CAPTURE_LEAD, ESCALATE, close_clients
from shared.gateway.schemas import MAX_REPLY_CHARS
from shared.gateway.service import CLIPPED_NOTE
from shared.redis import close_redis, get_redis
from shared.settings import get_settings
from shared.web.deps import get_request_database
from shared.widget import queries, visitor_tokens
from shared.widget.schemas import MAX_CONVERSATION_MESSAGES, MAX_MESSAGE_CHARS
from shared.widget.service import MODEL_FAILURE_REPLY
from tests.card_data import every_body, free_text_with_card, pans
from tests.conftest import (
    Connection,
    TransactionDatabase,
    counted_hits,
    counting_requests,
    forget_keys,
    waits_for_the_server,
    without_generated_ids,
)
from tests.factories import add_member, closed_port, create_agent, create_org, user_claims
from tests.fakes.hung_peer import hung_peer
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

ORIGIN = "https://shop.example"
OTHER_ORIGIN = "https://evil.example"
Configure = Callable[..., None]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture
async def configure(monkeypatch: pytest.MonkeyPatch, redis_bridge: tuple[str, str]) -> AsyncIterator[Configure]:
    """The function's environment: Redis through the REST bridge, no model key (offline) unless set."""

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    url, token = redis_bridge
    set_env(UPSTASH_REDIS_REST_URL=url, UPSTASH_REDIS_REST_TOKEN=token)
    await close_redis()
    yield set_env
    await close_clients()
    await close_redis()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def online(configure: Configure, fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reset()
    configure(OPENAI_API_KEY=fake_openai.api_key, OPENAI_BASE_URL=fake_openai.base_url, MODEL_TIMEOUT_SECONDS="5")
    return fake_openai


@pytest.fixture
async def app() -> FastAPI:
    # Imported on the running loop: Mangum's constructor creates an event loop when none is running.
    module = importlib.import_module("functions.external.widget_chat")
    function_app: FastAPI = module.app
    return function_app


@pytest.fixture
async def client(app: FastAPI, db: Connection, configure: Configure) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="https://api.hiredhands.test") as http:
            yield http
    finally:
        app.dependency_overrides.clear()


@pytest.fixture
def forget_rate_limits(direct_redis: redis.Redis) -> Iterator[list[uuid.UUID]]:
    """Agents whose widget counters are deleted after the test."""
    agents: list[uuid.UUID] = []
    yield agents
    forget_keys(direct_redis, *(f"hh:rl:widget-*:{agent_id}*" for agent_id in agents))


class Widget:
    def __init__(self, org: dict[str, Any], agent: dict[str, Any], key: str) -> None:
        self.org, self.agent, self.key = org, agent, key

    @property
    def chat_path(self) -> str:
        return f"/api/widget/{self.key}/chat"

    @property
    def config_path(self) -> str:
        return f"/api/widget/{self.key}/config"


@pytest.fixture
def make_widget(db: Connection, forget_rate_limits: list[uuid.UUID]) -> Callable[..., Any]:
    async def make(
        org: dict[str, Any] | None = None, *, origins: tuple[str, ...] = (ORIGIN,), **overrides: Any
    ) -> Widget:
        org = org or await create_org(db)
        key = overrides.pop("widget_key", None) or new_key()
        agent = await create_agent(
            db, org, widget_key=key, allowed_origins=list(origins), theme={"accent": "#0a7"}, **overrides
        )
        forget_rate_limits.append(agent["id"])
        return Widget(org, agent, key)

    return make


# -- helpers --------------------------------------------------------------------------------------


def new_key() -> str:
    return "hh_wk_" + secrets.token_hex(24)


async def send(
    client: httpx.AsyncClient,
    widget: Widget | str,
    message: str = "What are your opening hours?",
    *,
    token: str | None = None,
    origin: str | None = ORIGIN,
    address: str | None = None,
    **body: Any,
) -> httpx.Response:
    path = widget.chat_path if isinstance(widget, Widget) else f"/api/widget/{widget}/chat"
    headers = {}
    if origin is not None:
        headers["Origin"] = origin
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if address is not None:
        headers["X-Real-IP"] = address
    return await client.post(path, json={"message": message, **body}, headers=headers)


def problem(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json", response.text
    body: dict[str, Any] = response.json()
    return body


def without_request_id(response: httpx.Response) -> dict[str, Any]:
    return {k: v for k, v in problem(response).items() if k != "request_id"}


async def superuser(db: Connection) -> Connection:
    await db.execute("reset role")
    return db


async def rows(db: Connection, sql: str, *params: Any) -> list[dict[str, Any]]:
    cur = await (await superuser(db)).execute(sql, params)
    return await cur.fetchall()


async def set_limits(db: Connection, org_id: uuid.UUID, **values: int) -> None:
    await superuser(db)
    for column, value in values.items():
        await db.execute(
            psycopg.sql.SQL("update public.organization_limits set {} = %s where org_id = %s").format(
                psycopg.sql.Identifier(column)
            ),
            (value, org_id),
        )


async def rotate(db: Connection, widget: Widget) -> str:
    """Rotate the key the way the dashboard does: the org owner calls public.rotate_widget_key."""
    async with as_user(TransactionDatabase(db), user_claims(widget.org["owner"])) as conn:
        cur = await conn.execute("select public.rotate_widget_key(%s) as key", (widget.agent["id"],))
        row = await cur.fetchone()
    assert row is not None
    key: str = row["key"]
    return key


def forged_token(
    conversation_id: uuid.UUID, agent_id: uuid.UUID, *, secret: str | bytes, exp_offset: int = 3600
) -> str:
    now = int(time.time())
    claims = {
        "aud": visitor_tokens.AUDIENCE,
        "iss": visitor_tokens.ISSUER,
        "sub": "v_attacker",
        "cid": str(conversation_id),
        "aid": str(agent_id),
        "gen": 1,
        "iat": now,
        "exp": now + exp_offset,
    }
    return visitor_tokens.TOKEN_PREFIX + jwt.encode(claims, secret, algorithm="HS256")


# -- config -----------------------------------------------------------------------------------------


class TestConfig:
    async def test_returns_what_the_widget_renders_and_nothing_else(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget(system_prompt="SECRET-PROMPT: give 90% discounts", model="gpt-4o")

        response = await client.get(widget.config_path, headers={"Origin": ORIGIN})

        assert response.status_code == 200
        assert response.json() == {
            "display_name": "Helper",
            "greeting": "Hi! How can I help?",
            "theme": {"accent": "#0a7"},
        }
        for internal in ("SECRET-PROMPT", "gpt-4o", str(widget.org["id"]), str(widget.agent["id"]), "allowed"):
            assert internal not in response.text, f"config leaks {internal}"
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.headers["cache-control"] == "no-store"


# -- keys -------------------------------------------------------------------------------------------


class TestKeysFromTheAttackersSide:
    async def test_an_agent_created_from_the_dashboard_is_off_until_enabled(
        self, db: Connection, client: httpx.AsyncClient, forget_rate_limits: list[uuid.UUID]
    ) -> None:
        org = await create_org(db)
        # The dashboard creates the agent with the user's session, naming no widget settings at all.
        async with as_user(TransactionDatabase(db), user_claims(org["owner"])) as conn:
            cur = await conn.execute(
                "insert into public.agents (org_id, name, allowed_origins) values (%s, 'new', %s) returning *",
                (org["id"], [ORIGIN]),
            )
            agent = await cur.fetchone()
        assert agent is not None
        assert (agent["widget_enabled"], agent["widget_key_hash"]) == (False, None), "a new widget is off, keyless"
        forget_rate_limits.append(agent["id"])
        widget = Widget(org, agent, "")
        widget.key = await rotate(db, widget)

        off = await client.get(widget.config_path, headers={"Origin": ORIGIN})
        assert off.status_code == 404, "a key alone does not turn the widget on"

        async with as_user(TransactionDatabase(db), user_claims(org["owner"])) as conn:
            await conn.execute("update public.agents set widget_enabled = true where id = %s", (agent["id"],))
        on = await client.get(widget.config_path, headers={"Origin": ORIGIN})
        assert on.status_code == 200, on.text

    async def test_guessed_disabled_and_rotated_keys_get_the_same_404(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        disabled = await make_widget(widget_enabled=False)
        rotated = await make_widget()
        old_key = rotated.key
        new = await rotate(db, rotated)
        assert new != old_key
        assert new.startswith("hh_wk_")
        assert len(new) == 6 + 48

        keys = {
            "guessed": new_key(),
            "malformed": "not-a-key",
            "disabled": disabled.key,
            "rotated-out": old_key,
        }
        answers = {}
        for name, key in keys.items():
            config = await client.get(f"/api/widget/{key}/config", headers={"Origin": ORIGIN})
            chat = await send(client, key)
            preflight = await client.options(
                f"/api/widget/{key}/chat", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
            )
            for response in (config, chat, preflight):
                assert response.status_code == 404, f"{name}: {response.status_code}"
                assert "access-control-allow-origin" not in response.headers, name
            answers[name] = [without_request_id(r) for r in (config, chat, preflight)]

        assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) == 1, answers
        assert answers["guessed"][0]["type"].endswith("/widget-not-found")
        conversations = await rows(
            db,
            "select id from public.conversations where agent_id = any(%s)",
            [disabled.agent["id"], rotated.agent["id"]],
        )
        assert conversations == []

    async def test_the_new_key_works_at_once_after_rotation(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        assert (await send(client, widget)).status_code == 200

        widget.key = await rotate(db, widget)

        assert (await send(client, widget)).status_code == 200

    async def test_a_key_is_stored_only_as_its_hash(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        new = await rotate(db, widget)

        [row] = await rows(db, "select to_jsonb(a) as agent from public.agents as a where id = %s", widget.agent["id"])
        assert new not in json.dumps(row["agent"])
        assert new[-4:] == row["agent"]["widget_key_hint"]

    async def test_the_key_never_reaches_the_log(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any], log_lines: list[str]
    ) -> None:
        widget = await make_widget()
        await send(client, widget)
        await send(client, new_key())

        assert log_lines
        assert not [line for line in log_lines if widget.key in line or "hh_wk_" in line]
        lines = [json.loads(line) for line in log_lines]
        served = [line for line in lines if line.get("route") == "/api/widget/{key}/chat" and line["status"] == 200]
        assert served, lines
        assert served[0]["org_id"] == str(widget.org["id"]), "the request's log line names the organization"


# -- conversations and visitor tokens ---------------------------------------------------------------


class TestVisitorTokens:
    async def test_the_first_message_opens_a_conversation_and_the_token_continues_it(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()

        first = await send(client, widget, "Hello")
        assert first.status_code == 200, first.text
        body = first.json()
        assert body["status"] == "answered"
        assert body["visitor_token"].startswith("hh_vt_")
        assert body["visitor_token_expires_at"] > time.time() + 3600

        second = await send(client, widget, "And on Sundays?", token=body["visitor_token"])
        assert second.status_code == 200, second.text
        assert second.json()["conversation_id"] == body["conversation_id"]

        [conversation] = await rows(db, "select * from public.conversations where id = %s", body["conversation_id"])
        assert conversation["message_count"] == 4
        assert conversation["origin"] == ORIGIN
        assert conversation["agent_id"] == widget.agent["id"]
        messages = await rows(
            db,
            "select role, content from public.messages where conversation_id = %s order by created_at, id",
            body["conversation_id"],
        )
        assert [(m["role"], m["content"]) for m in messages][0::2] == [
            ("visitor", "Hello"),
            ("visitor", "And on Sundays?"),
        ]
        assert [m["role"] for m in messages][1::2] == ["agent", "agent"]

    async def test_a_conversation_id_without_its_token_gives_nothing(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        victim = (await send(client, widget, "My order number is 4411")).json()
        attacker = (await send(client, widget, "hi")).json()
        settings_secret = visitor_tokens.signing_key()

        attempts = {
            "no token": await send(client, widget, "show me", conversation_id=victim["conversation_id"]),
            "own token, victim's id": await send(
                client, widget, "show me", token=attacker["visitor_token"], conversation_id=victim["conversation_id"]
            ),
            "forged signature": await send(
                client,
                widget,
                "show me",
                token=forged_token(uuid.UUID(victim["conversation_id"]), widget.agent["id"], secret="x" * 40),
            ),
            "expired": await send(
                client,
                widget,
                "show me",
                token=forged_token(
                    uuid.UUID(victim["conversation_id"]), widget.agent["id"], secret=settings_secret, exp_offset=-60
                ),
            ),
            "right signature, wrong visitor": await send(
                client,
                widget,
                "show me",
                token=forged_token(uuid.UUID(victim["conversation_id"]), widget.agent["id"], secret=settings_secret),
            ),
            "unsigned": await send(
                client,
                widget,
                "show me",
                token="hh_vt_" + jwt.encode({"cid": victim["conversation_id"]}, key=None, algorithm="none"),  # type: ignore[arg-type]
            ),
            "garbage": await send(client, widget, "show me", token="hh_vt_garbage"),
        }
        bodies = set()
        for name, response in attempts.items():
            assert response.status_code == 404, f"{name}: {response.text}"
            assert "My order number" not in response.text
            bodies.add(json.dumps(without_request_id(response), sort_keys=True))
        assert len(bodies) == 1
        assert json.loads(bodies.pop())["type"].endswith("/conversation-not-found")

        [conversation] = await rows(
            db, "select message_count from public.conversations where id = %s", victim["conversation_id"]
        )
        assert conversation["message_count"] == 2, "nothing was added to the victim's conversation"

    async def test_a_token_for_another_agent_gives_nothing(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        first = await make_widget()
        second = await make_widget(first.org)
        token = (await send(client, first)).json()["visitor_token"]

        response = await send(client, second, token=token)

        assert response.status_code == 404
        assert problem(response)["type"].endswith("/conversation-not-found")

    async def test_another_authorization_scheme_is_not_a_token(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        response = await client.post(
            widget.chat_path, json={"message": "hi"}, headers={"Origin": ORIGIN, "Authorization": "Basic Zm9vOmJhcg=="}
        )
        assert response.status_code == 404

    async def test_a_closed_conversation_takes_no_more_messages(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        opened = (await send(client, widget)).json()
        await (await superuser(db)).execute(
            "update public.conversations set status = 'closed' where id = %s", (opened["conversation_id"],)
        )

        response = await send(client, widget, token=opened["visitor_token"])

        assert response.status_code == 409
        assert problem(response)["type"].endswith("/conversation-closed")

    async def test_a_superseded_token_stops_working_once_a_newer_one_was_used(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        """A token left behind (a shared computer, a copied request) is dead one message later."""
        widget = await make_widget()
        first = (await send(client, widget, "My order number is 4411")).json()
        second = (await send(client, widget, "and?", token=first["visitor_token"])).json()
        third = await send(client, widget, "and then?", token=second["visitor_token"])
        assert third.status_code == 200, third.text

        stolen = await send(client, widget, "what was my order number?", token=first["visitor_token"])

        assert stolen.status_code == 404
        assert problem(stolen)["type"].endswith("/conversation-not-found")
        assert "4411" not in stolen.text
        [conversation] = await rows(
            db, "select message_count from public.conversations where id = %s", first["conversation_id"]
        )
        assert conversation["message_count"] == 6, "the stolen token added nothing"

    async def test_a_reply_lost_on_the_way_can_be_retried_with_the_previous_token(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        first = (await send(client, widget)).json()
        await send(client, widget, "one", token=first["visitor_token"])  # its reply never reached the visitor

        retried = await send(client, widget, "one", token=first["visitor_token"])
        assert retried.status_code == 200, retried.text
        assert retried.json()["conversation_id"] == first["conversation_id"]
        assert (await send(client, widget, "two", token=retried.json()["visitor_token"])).status_code == 200
        assert (await send(client, widget, "three", token=first["visitor_token"])).status_code == 404

    async def test_closing_a_conversation_revokes_its_tokens_for_good(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        first = (await send(client, widget)).json()
        latest = (await send(client, widget, "more", token=first["visitor_token"])).json()
        await (await superuser(db)).execute(
            "update public.conversations set status = 'closed' where id = %s", (first["conversation_id"],)
        )
        closed = await send(client, widget, token=latest["visitor_token"])
        assert closed.status_code == 409
        assert problem(closed)["type"].endswith("/conversation-closed")

        await db.execute("update public.conversations set status = 'open' where id = %s", (first["conversation_id"],))
        for token in (first["visitor_token"], latest["visitor_token"]):
            reopened = await send(client, widget, "back again", token=token)
            assert reopened.status_code == 404, "a token issued before the close works again after a reopen"
        [conversation] = await rows(
            db, "select message_count from public.conversations where id = %s", first["conversation_id"]
        )
        assert conversation["message_count"] == 4

    async def test_a_turn_that_arrives_after_the_close_is_not_stored(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        opened = (await send(client, widget)).json()
        await (await superuser(db)).execute(
            "update public.conversations set status = 'closed' where id = %s", (opened["conversation_id"],)
        )
        [row] = await rows(db, "select visitor_id from public.conversations where id = %s", opened["conversation_id"])
        stored = await queries.store_turn(
            TransactionDatabase(db),
            conversation_id=uuid.UUID(opened["conversation_id"]),
            org_id=widget.org["id"],
            agent_id=widget.agent["id"],
            visitor_id=row["visitor_id"],
            origin=ORIGIN,
            messages=[queries.NewMessage("visitor", "late", datetime.now(UTC))],
            items=[],
        )
        assert (stored.messages, stored.token_generation) == (0, None)

    async def test_a_full_conversation_is_a_409(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        opened = (await send(client, widget)).json()
        await (await superuser(db)).execute(
            "insert into public.messages (org_id, conversation_id, role, content)"
            " select %s, %s, 'visitor', 'x' from generate_series(1, %s)",
            (widget.org["id"], opened["conversation_id"], MAX_CONVERSATION_MESSAGES - 2),
        )

        response = await send(client, widget, token=opened["visitor_token"])

        assert response.status_code == 409
        assert problem(response)["type"].endswith("/conversation-full")


# -- origins ----------------------------------------------------------------------------------------


class TestOrigins:
    async def test_only_an_allowed_origin_gets_cors_headers(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()

        allowed = await send(client, widget, origin=ORIGIN)
        refused = await send(client, widget, origin=OTHER_ORIGIN)
        lookalike = await send(client, widget, origin="https://shop.example.evil.example")

        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "origin" in allowed.headers["vary"].lower()
        for response in (refused, lookalike):
            assert response.status_code == 403
            assert problem(response)["type"].endswith("/origin-not-allowed")
            assert "access-control-allow-origin" not in response.headers
        assert await rows(db, "select 1 from public.conversations where agent_id = %s", widget.agent["id"]) == [
            {"?column?": 1}
        ]

    async def test_preflight_grants_only_allowed_origins(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        request_headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}

        allowed = await client.options(widget.chat_path, headers={"Origin": ORIGIN, **request_headers})
        refused = await client.options(widget.chat_path, headers={"Origin": OTHER_ORIGIN, **request_headers})

        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        assert "authorization" in allowed.headers["access-control-allow-headers"]
        assert refused.status_code == 403
        assert not [h for h in refused.headers if h.startswith("access-control-")]

    async def test_an_allowed_origin_can_read_errors_such_as_a_429(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        await set_limits(db, widget.org["id"], widget_rpm_per_visitor=1)
        await send(client, widget)

        limited = await send(client, widget)

        assert limited.status_code == 429
        assert limited.headers["access-control-allow-origin"] == ORIGIN
        assert "retry-after" in limited.headers["access-control-expose-headers"]

    async def test_a_restricted_agent_refuses_requests_without_an_origin(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        response = await send(client, widget, origin=None)
        assert response.status_code == 403

    async def test_an_agent_with_no_origins_serves_no_website_but_serves_servers(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget(origins=())

        from_a_site = await send(client, widget, origin=ORIGIN)
        from_a_server = await send(client, widget, origin=None)

        assert from_a_site.status_code == 403
        assert from_a_server.status_code == 200
        assert "access-control-allow-origin" not in from_a_server.headers

    async def test_origin_null_is_refused(self, client: httpx.AsyncClient, make_widget: Callable[..., Any]) -> None:
        widget = await make_widget()
        assert (await send(client, widget, origin="null")).status_code == 403


def _bad_requests(widget: Widget) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Requests refused at every stage, before and after the agent is known: name -> (method, path, kwargs)."""
    json_type = {"content-type": "application/json"}
    return {
        "unknown key": ("POST", f"/api/widget/{new_key()}/chat", {"json": {"message": "hi"}}),
        "unknown key config": ("GET", f"/api/widget/{new_key()}/config", {}),
        "method not allowed": ("PUT", widget.chat_path, {"json": {"message": "hi"}}),
        "validation": ("POST", widget.chat_path, {"json": {"message": ""}}),
        "malformed json": ("POST", widget.chat_path, {"content": b'{"message": ', "headers": json_type}),
        "invalid utf-8": ("POST", widget.chat_path, {"content": b'{"message": "\xff\xfe"}', "headers": json_type}),
        "nested too deep": (
            "POST",
            widget.chat_path,
            {"content": b'{"message": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": json_type},
        ),
        "half a surrogate": ("POST", widget.chat_path, {"content": b'{"message": "\\ud800"}', "headers": json_type}),
        "card data": ("POST", widget.chat_path, {"json": {"message": "4242 4242 4242 4242"}}),
        "too large": ("POST", widget.chat_path, {"content": b"x" * 70_000, "headers": json_type}),
        "bad token": ("POST", widget.chat_path, {"json": {"message": "hi"}, "headers": {"Authorization": "Bearer x"}}),
    }


class TestEveryAnswerKeepsItsHeaders:
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        kind=st.sampled_from(sorted(_bad_requests(Widget({}, {}, new_key())))),
        origin=st.sampled_from([ORIGIN, OTHER_ORIGIN, None]),
    )
    async def test_vary_origin_request_id_and_no_store_on_every_refusal(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any], kind: str, origin: str | None
    ) -> None:
        widget = await make_widget()
        method, path, request = _bad_requests(widget)[kind]
        headers = {**request.pop("headers", {}), **({"Origin": origin} if origin else {})}

        response = await client.request(method, path, headers=headers, **request)

        assert 400 <= response.status_code < 500, f"{kind}: {response.status_code} {response.text[:200]}"
        assert response.headers["content-type"] == "application/problem+json", kind
        assert response.headers.get_list("vary") == ["Origin"], kind
        assert response.headers["cache-control"] == "no-store", kind
        assert response.headers["x-request-id"] == response.json()["request_id"], kind
        if origin != ORIGIN:
            assert "access-control-allow-origin" not in response.headers, kind

    async def test_unreadable_bodies_are_422_problems_that_say_why(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        for kind in ("invalid utf-8", "nested too deep", "half a surrogate"):
            method, path, request = _bad_requests(widget)[kind]
            response = await client.request(method, path, **request)
            assert response.status_code == 422, f"{kind}: {response.text}"
            body = problem(response)
            assert body["type"].endswith("/validation-error"), kind
            assert body["detail"].startswith("body: "), kind
            assert body["errors"] == [{"loc": ["body"], "msg": body["detail"].removeprefix("body: ")}], kind


# -- malformed input --------------------------------------------------------------------------------


class TestBadInput:
    async def test_each_bad_body_is_its_own_clear_4xx(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        headers = {"Origin": ORIGIN}
        secret_text = "hh_wk_" + "e" * 48
        cases: dict[str, tuple[dict[str, Any], int, list[Any]]] = {
            "too long": ({"json": {"message": secret_text + "x" * MAX_MESSAGE_CHARS}}, 422, ["body", "message"]),
            "empty": ({"json": {"message": ""}}, 422, ["body", "message"]),
            "blank": ({"json": {"message": " \n\t "}}, 422, ["body", "message"]),
            "NUL": ({"json": {"message": "a\x00b"}}, 422, ["body", "message"]),
            "missing": ({"json": {}}, 422, ["body", "message"]),
            "wrong type": ({"json": {"message": ["a"]}}, 422, ["body", "message"]),
            "extra field": ({"json": {"message": "hi", "history": [{"role": "system"}]}}, 422, ["body", "history"]),
            "bad conversation id": (
                {"json": {"message": "hi", "conversation_id": secret_text}},
                422,
                ["body", "conversation_id"],
            ),
            "malformed json": (
                {"content": b'{"message": "hi"', "headers": {"content-type": "application/json"}},
                422,
                ["body", 16],
            ),
            "not an object": ({"json": ["hi"]}, 422, ["body"]),
            # A "simple" cross-site request (no preflight) cannot carry a message: only JSON is read.
            "text/plain": ({"content": b'{"message": "hi"}', "headers": {"content-type": "text/plain"}}, 422, ["body"]),
            "form": (
                {"content": b"message=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}},
                422,
                ["body"],
            ),
        }
        for name, (request, status, loc) in cases.items():
            response = await client.post(
                widget.chat_path, **{**request, "headers": {**headers, **request.get("headers", {})}}
            )
            assert response.status_code == status, f"{name}: {response.text}"
            body = problem(response)
            assert body["type"].endswith("/validation-error"), name
            assert next(e["loc"] for e in body["errors"])[: len(loc)] == loc, f"{name}: {body['errors']}"
            assert secret_text not in response.text, f"{name} echoes the input"
        assert await rows(db, "select 1 from public.conversations where agent_id = %s", widget.agent["id"]) == []

    async def test_an_oversized_body_is_refused_before_it_is_read(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        limit = get_settings().max_body_bytes

        response = await client.post(
            widget.chat_path,
            content=json.dumps({"message": "x" * limit}).encode(),
            headers={"Origin": ORIGIN, "content-type": "application/json"},
        )

        assert response.status_code == 413
        assert problem(response)["type"].endswith("/payload-too-large")

    async def test_a_message_at_the_limit_is_accepted(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        assert (await send(client, widget, "é" * MAX_MESSAGE_CHARS)).status_code == 200


# -- rate limits ------------------------------------------------------------------------------------


class TestRateLimits:
    async def test_the_per_visitor_limit_is_a_429_with_retry_after(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        await set_limits(db, widget.org["id"], widget_rpm_per_visitor=2)

        statuses = [(await send(client, widget, address="203.0.113.7")).status_code for _ in range(3)]
        other_visitor = await send(client, widget, address="198.51.100.9")

        assert statuses == [200, 200, 429]
        assert other_visitor.status_code == 200
        limited = await send(client, widget, address="203.0.113.7")
        assert problem(limited)["type"].endswith("/rate-limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60

    async def test_the_per_agent_limit_holds_across_visitors(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        other_agent = await make_widget(widget.org)
        await set_limits(db, widget.org["id"], widget_rpm_per_agent=3, widget_rpm_per_visitor=100)

        statuses = [(await send(client, widget, address=f"192.0.2.{i}")).status_code for i in range(5)]

        assert statuses == [200, 200, 200, 429, 429]
        assert (await send(client, other_agent)).status_code == 200, "each agent has its own allowance"

    async def test_a_refused_visitor_does_not_use_up_the_agents_allowance(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        await set_limits(db, widget.org["id"], widget_rpm_per_agent=3, widget_rpm_per_visitor=1)

        flood = [(await send(client, widget, address="203.0.113.66")).status_code for _ in range(10)]
        others = [(await send(client, widget, address=f"192.0.2.{i}")).status_code for i in range(2)]

        assert flood == [200] + [429] * 9
        assert others == [200, 200]

    async def test_requests_with_bad_tokens_count_against_the_visitor(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        await set_limits(db, widget.org["id"], widget_rpm_per_visitor=3)

        statuses = [(await send(client, widget, token=f"hh_vt_guess{i}")).status_code for i in range(5)]

        assert statuses == [404, 404, 404, 429, 429]

    async def test_with_redis_unreachable_the_agent_limit_is_counted_in_postgres(
        self,
        db: Connection,
        configure: Configure,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
        log_lines: list[str],
    ) -> None:
        widget = await make_widget()
        await set_limits(db, widget.org["id"], widget_rpm_per_agent=2)
        configure(UPSTASH_REDIS_REST_URL=f"http://127.0.0.1:{closed_port()}")
        await close_redis()

        statuses = [(await send(client, widget, address=f"192.0.2.{i}")).status_code for i in range(3)]

        assert statuses == [200, 200, 429]
        fallbacks = [json.loads(line) for line in log_lines if "ratelimit-fallback" in line]
        assert len(fallbacks) == 3
        assert fallbacks[0]["org_id"] == str(widget.org["id"])
        assert fallbacks[0]["error_type"]


class TestHungRedis:
    """A Redis that accepts connections and never answers (a real loopback peer, not a closed port)."""

    TIMEOUT_SECONDS = 1.5

    async def test_a_turn_costs_at_most_one_timeout_and_the_next_turn_none(
        self,
        db: Connection,
        online: FakeOpenAI,
        configure: Configure,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
        log_lines: list[str],
    ) -> None:
        widget = await make_widget()
        await superuser(db)
        await db.execute(
            "insert into public.knowledge_chunks (org_id, agent_id, title, content) values (%s, %s, 'Hours', %s)",
            (widget.org["id"], widget.agent["id"], "We open at 9."),
        )
        # A first turn with Redis up, so the timings below hold no first-use costs (SDK imports, clients).
        assert (await send(client, widget, "Hello", address="192.0.2.9")).status_code == 200
        online.requests.clear()
        async with hung_peer() as peer:
            # Three Redis calls per turn: the visitor's limit, the burst limit before the embedding and
            # before the reply. Each used to wait for its own timeout.
            configure(UPSTASH_REDIS_REST_URL=peer.url, UPSTASH_REDIS_TIMEOUT_SECONDS=str(self.TIMEOUT_SECONDS))
            await close_redis()

            started = time.perf_counter()
            first = await send(client, widget, "When do you open?", address="192.0.2.1")
            first_seconds = time.perf_counter() - started
            after_first = peer.requests
            started = time.perf_counter()
            second = await send(client, widget, "And on Sundays?", address="192.0.2.2")
            second_seconds = time.perf_counter() - started

        assert first.status_code == 200, first.text
        assert second.status_code == 200, second.text
        assert after_first == 1, "the first turn waited on Redis once; its other calls took the fallback at once"
        assert peer.requests == 1, "within the open time, the next turn does not ask Redis at all"
        assert first_seconds < 2 * self.TIMEOUT_SECONDS, f"one timeout, not three: {first_seconds:.2f} s"
        assert second_seconds < self.TIMEOUT_SECONDS, f"no timeout at all: {second_seconds:.2f} s"
        assert len(online.requests_to("/v1/embeddings")) == 2, "both turns were answered in full"
        reasons = [json.loads(line).get("decision_reason") for line in log_lines]
        assert reasons.count("ratelimit-fallback") == 2, "each turn counted its visitor limit in Postgres"


# -- budgets and degradation ------------------------------------------------------------------------


class TestBudgetAndBurst:
    async def test_budget_exhausted_mid_conversation_is_a_friendly_503_with_no_model_call(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        opened = await send(client, widget, "Do you ship to Canada?")
        assert opened.status_code == 200, opened.text
        calls_before = len(online.requests)
        await set_limits(db, widget.org["id"], monthly_budget_microusd=1)

        refused = await send(client, widget, "And to Mexico?", token=opened.json()["visitor_token"])

        assert refused.status_code == 503
        body = problem(refused)
        assert body["type"].endswith("/agent-unavailable")
        assert "try again" in body["detail"]
        assert "budget" not in refused.text.lower()
        assert int(refused.headers["retry-after"]) > 0
        assert refused.headers["access-control-allow-origin"] == ORIGIN
        assert len(online.requests) == calls_before, "no model call once the budget is exhausted"
        [conversation] = await rows(
            db, "select message_count from public.conversations where id = %s", opened.json()["conversation_id"]
        )
        assert conversation["message_count"] == 2, "nothing stored: the widget may send the message again"
        outcomes = await rows(
            db,
            "select kind, outcome, cost_microusd from public.usage_events where org_id = %s order by id",
            widget.org["id"],
        )
        assert outcomes[-1] == {"kind": "chat", "outcome": "rejected", "cost_microusd": 0}

    async def test_the_organizations_burst_limit_is_the_same_friendly_503(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any], direct_redis: redis.Redis
    ) -> None:
        widget = await make_widget()
        await set_limits(db, widget.org["id"], burst_per_minute=1)
        try:
            assert (await send(client, widget)).status_code == 200
            refused = await send(client, widget)
        finally:
            forget_keys(direct_redis, f"hh:rl:model-burst:{widget.org['id']}:*")

        assert refused.status_code == 503
        assert problem(refused)["type"].endswith("/agent-unavailable")
        assert int(refused.headers["retry-after"]) >= 1

    @pytest.mark.parametrize(("knowledge", "calls"), [(False, 1), (True, 2)])
    async def test_a_turn_counts_each_of_its_model_calls_against_the_burst_limit_once(
        self,
        knowledge: bool,
        calls: int,
        db: Connection,
        online: FakeOpenAI,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
        direct_redis: redis.Redis,
    ) -> None:
        widget = await make_widget()
        if knowledge:
            await (await superuser(db)).execute(
                "insert into public.knowledge_chunks (org_id, agent_id, title, content) values (%s, %s, 'Repairs', %s)",
                (widget.org["id"], widget.agent["id"], "We repair e-bikes of every brand."),
            )
        pattern = f"hh:rl:model-burst:{widget.org['id']}:*"
        try:
            response = await send(client, widget, "Do you repair e-bikes?")
            counted = counted_hits(direct_redis, pattern)
        finally:
            forget_keys(direct_redis, pattern)

        assert response.status_code == 200
        assert len(online.requests) == calls, "an embedding of the question, with knowledge, then the reply"
        assert counted == calls, "counted once, in advance, and not again by the calls themselves"


GENERATED_FIELDS = ("conversation_id", "visitor_token", "visitor_token_expires_at")


class TestModelFailures:
    @pytest.mark.parametrize("failure", ["error", "timeout"])
    async def test_a_failing_model_gives_a_friendly_reply_and_an_escalation(
        self,
        failure: str,
        db: Connection,
        online: FakeOpenAI,
        configure: Configure,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
    ) -> None:
        widget = await make_widget()
        if failure == "error":
            online.fail_status = 500
        else:
            configure(MODEL_TIMEOUT_SECONDS="0.3")
            online.delay_seconds = 2

        response = await send(client, widget, "Can I change my delivery address?")

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["reply"] == MODEL_FAILURE_REPLY
        assert body["status"] == "handed_to_team"
        # Everything but the generated ids and the token, whose random characters may spell "500".
        visible = json.dumps({k: v for k, v in body.items() if k not in GENERATED_FIELDS})
        for leak in ("server had an error", "Traceback", "openai", "500", "timed out"):
            assert leak not in visible
        [item] = await rows(
            db,
            "select kind, status, payload, conversation_id from public.review_items where org_id = %s",
            widget.org["id"],
        )
        assert item["kind"] == "escalation"
        assert item["status"] == "pending"
        assert item["payload"]["reason"] == "model_unavailable"
        assert item["payload"]["summary"] == "Can I change my delivery address?"
        assert str(item["conversation_id"]) == body["conversation_id"]
        [usage] = await rows(
            db,
            "select outcome, cost_microusd, estimated from public.usage_events where org_id = %s and kind = 'chat'",
            widget.org["id"],
        )
        assert usage["outcome"] == failure
        if failure == "error":  # the provider answered 500: nothing billed
            assert (usage["cost_microusd"], usage["estimated"]) == (0, False)
        else:  # the request went out and the provider may still bill it: charged at its bound
            assert usage["cost_microusd"] > 0
            assert usage["estimated"] is True
        [conversation] = await rows(
            db, "select status from public.conversations where id = %s", body["conversation_id"]
        )
        assert conversation["status"] == "escalated"


class TestMalformedAnswers:
    """A provider answer that is not the documented shape ends as outcome ``error``: a friendly
    reply, an escalation, the transcript stored, a usage row and the hold released."""

    @pytest.mark.parametrize(
        ("case", "setup"),
        [
            ("a 200 that is not JSON", lambda fake: setattr(fake, "raw_bytes", b"{not json")),
            ("content that is a number", lambda fake: setattr(fake.reply, "content", 42)),
            ("content that is an object", lambda fake: setattr(fake.reply, "content", {"text": "hi"})),
            ("a fractional token count", lambda fake: setattr(fake.reply, "prompt_tokens", 1.5)),
            ("a token count as text", lambda fake: setattr(fake.reply, "completion_tokens", "20")),
            ("a token count past 2^31-1", lambda fake: setattr(fake.reply, "prompt_tokens", 2**31)),
        ],
    )
    async def test_a_malformed_answer_is_an_error_with_a_reply_an_escalation_and_a_transcript(
        self,
        case: str,
        setup: Callable[[FakeOpenAI], None],
        db: Connection,
        online: FakeOpenAI,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
    ) -> None:
        widget = await make_widget()
        setup(online)

        response = await send(client, widget, "Do you ship to Norway?")

        assert response.status_code == 200, (case, response.text)
        body = response.json()
        assert (body["reply"], body["status"]) == (MODEL_FAILURE_REPLY, "handed_to_team"), case
        [item] = await rows(db, "select kind, payload from public.review_items where org_id = %s", widget.org["id"])
        assert (item["kind"], item["payload"]["reason"]) == ("escalation", "model_unavailable")
        transcript = await rows(
            db,
            "select role, content from public.messages where conversation_id = %s order by created_at, id",
            body["conversation_id"],
        )
        assert [m["content"] for m in transcript] == ["Do you ship to Norway?", MODEL_FAILURE_REPLY]
        [usage] = await rows(
            db,
            "select outcome, cost_microusd, estimated, prompt_tokens from public.usage_events"
            " where org_id = %s and kind = 'chat'",
            widget.org["id"],
        )
        assert usage == {"outcome": "error", "cost_microusd": 0, "estimated": False, "prompt_tokens": 0}, case
        holds = await rows(db, "select status from public.budget_reservations where org_id = %s", widget.org["id"])
        assert [h["status"] for h in holds] == ["released"]

    async def test_a_reply_past_the_transcript_limit_is_clipped_saying_so_and_stored(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        online.reply.content = "All about shipping. " * 7_500  # 150,000 characters

        response = await send(client, widget, "Tell me everything about shipping")

        assert response.status_code == 200, response.text
        body = response.json()
        [reply] = await rows(
            db,
            "select content, usage_event_id from public.messages where conversation_id = %s and role <> 'visitor'",
            body["conversation_id"],
        )
        assert len(reply["content"]) == MAX_REPLY_CHARS
        assert reply["content"].startswith("All about shipping. ")
        assert reply["content"].endswith(CLIPPED_NOTE)
        assert body["reply"] == reply["content"]
        [usage] = await rows(
            db, "select id, outcome, cost_microusd from public.usage_events where org_id = %s", widget.org["id"]
        )
        assert (usage["outcome"], usage["id"]) == ("ok", reply["usage_event_id"])
        assert usage["cost_microusd"] > 0, "the model answered and is paid for; the transcript shows what it said"


class TestToolCalls:
    async def test_an_escalation_lands_in_the_review_queue_with_its_draft(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        online.reply.content = ""
        online.reply.tool_calls = [
            (
                ESCALATE,
                {
                    "reason": "cannot_answer",
                    "summary": "Wants a bulk discount for 40 bikes.",
                    "draft_reply": "We offer 10% off orders of 20 or more.",
                },
            )
        ]

        response = await send(client, widget, "Discount for 40 bikes?")

        assert response.status_code == 200
        assert response.json()["status"] == "handed_to_team"
        assert response.json()["reply"]
        [item] = await rows(db, "select * from public.review_items where org_id = %s", widget.org["id"])
        assert item["kind"] == "escalation"
        assert item["payload"]["draft_reply"] == "We offer 10% off orders of 20 or more."
        assert item["title"].startswith("The agent could not answer")
        assert str(item["conversation_id"]) == response.json()["conversation_id"]
        history = await rows(
            db,
            "select from_status, to_status from public.review_item_status_history where review_item_id = %s",
            item["id"],
        )
        assert history == [{"from_status": None, "to_status": "pending"}]

    async def test_repeated_escalations_of_one_conversation_make_one_item(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        online.reply.tool_calls = [
            (ESCALATE, {"reason": "visitor_requested_human", "summary": "s", "draft_reply": ""})
        ] * 2
        token = (await send(client, widget, "human please")).json()["visitor_token"]
        await send(client, widget, "HUMAN PLEASE", token=token)

        items = await rows(db, "select kind from public.review_items where org_id = %s", widget.org["id"])
        assert items == [{"kind": "escalation"}]

    async def test_a_lead_is_stored_with_validated_contacts_and_its_conversation(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        online.reply.tool_calls = [
            (CAPTURE_LEAD, {"email": "Ana@Example.COM", "phone": "+1 (415) 555-0100", "name": "Ana", "note": "Fleet"})
        ]

        response = await send(client, widget, "I'm Ana, ana@example.com, +1 (415) 555-0100")

        [item] = await rows(db, "select * from public.review_items where org_id = %s", widget.org["id"])
        assert item["kind"] == "lead"
        assert item["payload"] == {"email": "Ana@example.com", "phone": "+14155550100", "name": "Ana", "note": "Fleet"}
        assert str(item["conversation_id"]) == response.json()["conversation_id"]
        assert response.json()["status"] == "answered"

    async def test_a_lead_with_no_valid_contact_is_not_stored(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        online.reply.tool_calls = [
            (CAPTURE_LEAD, {"email": "not-an-email", "phone": "call me maybe", "name": "X", "note": None}),
            (CAPTURE_LEAD, "{not json"),
        ]

        response = await send(client, widget, "contact me")

        assert response.status_code == 200
        assert await rows(db, "select 1 from public.review_items where org_id = %s", widget.org["id"]) == []

    async def test_offline_the_visitor_asking_for_a_person_and_leaving_an_email_reaches_the_queue(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()

        response = await send(client, widget, "Can I talk to a human? My email is bo@example.org")

        assert response.json()["status"] == "handed_to_team"
        items = await rows(
            db,
            "select kind, payload->>'email' as email from public.review_items where org_id = %s order by kind",
            widget.org["id"],
        )
        assert items == [{"kind": "escalation", "email": None}, {"kind": "lead", "email": "bo@example.org"}]


class TestTranscripts:
    async def test_each_reply_records_the_model_call_that_wrote_it(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()

        assert (await send(client, widget, "Do you ship to Canada?")).status_code == 200

        [visitor, reply] = await rows(
            db,
            "select role, content, model, prompt_tokens, completion_tokens, latency_ms, usage_event_id"
            " from public.messages where org_id = %s order by id",
            widget.org["id"],
        )
        [usage] = await rows(
            db,
            "select id, model, prompt_tokens, completion_tokens, latency_ms from public.usage_events"
            " where org_id = %s and kind = 'chat'",
            widget.org["id"],
        )
        assert (visitor["role"], visitor["content"], visitor["model"], visitor["usage_event_id"]) == (
            "visitor",
            "Do you ship to Canada?",
            None,
            None,
        )
        assert reply["role"] == "agent"
        assert (
            reply["usage_event_id"],
            reply["model"],
            reply["prompt_tokens"],
            reply["completion_tokens"],
            reply["latency_ms"],
        ) == (usage["id"], usage["model"], usage["prompt_tokens"], usage["completion_tokens"], usage["latency_ms"])
        assert reply["prompt_tokens"] > 0
        assert reply["latency_ms"] is not None


class TestCardData:
    async def test_a_card_number_pasted_into_the_chat_is_refused_and_never_stored(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        before = len(online.requests_to("/v1/chat/completions"))

        response = await send(client, widget, "my card is 4242 4242 4242 4242, exp 12/29")

        assert response.status_code == 422
        assert problem(response)["type"].endswith("/card-data-refused")
        assert "4242" not in without_generated_ids(response.text)
        assert await rows(db, "select id from public.messages where org_id = %s", widget.org["id"]) == []
        assert len(online.requests_to("/v1/chat/completions")) == before, "the number never reached a model"

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(case=free_text_with_card())
    async def test_a_card_number_in_any_encoding_is_refused_and_never_stored_logged_or_sent(
        self,
        db: Connection,
        online: FakeOpenAI,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
        log_lines: list[str],
        case: tuple[str, str],
    ) -> None:
        text, pan = case
        widget = await make_widget()
        before = len(online.requests)
        for body in every_body({"message": text}):
            response = await client.post(
                widget.chat_path, content=body.content, headers={"Origin": ORIGIN, "content-type": body.content_type}
            )
            assert response.status_code == 422, f"{body.encoding}: {response.text}"
            assert problem(response)["type"].endswith("/card-data-refused"), body.encoding
            assert response.headers["vary"] == "Origin"
            assert pan not in without_generated_ids(response.text)
        assert all(pan not in without_generated_ids(line) for line in log_lines)
        assert await rows(db, "select id from public.messages where org_id = %s", widget.org["id"]) == []
        assert len(online.requests) == before, "the number never reached a model"

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(pan=pans())
    async def test_a_card_number_as_a_field_name_never_comes_back(
        self, client: httpx.AsyncClient, make_widget: Callable[..., Any], log_lines: list[str], pan: str
    ) -> None:
        widget = await make_widget()
        escaped_key = "".join(f"\\u{ord(c):04x}" for c in pan)  # the raw body holds no digit run
        for content in (f'{{"message": "hi", "{escaped_key}": 1}}', f'{{"message": "hi", "x": {{"{pan}": 1}}}}'):
            response = await client.post(
                widget.chat_path,
                content=content.encode(),
                headers={"Origin": ORIGIN, "content-type": "application/json"},
            )
            assert response.status_code == 422, response.text
            assert problem(response)["type"].endswith("/card-data-refused")
            assert pan not in response.text
        assert all(pan not in line for line in log_lines)


class TestKnowledge:
    async def test_the_model_is_given_the_agents_knowledge_and_history_and_never_another_agents(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget(system_prompt="You answer for Acme Bikes.")
        other = await make_widget()
        await superuser(db)
        for agent, content in ((widget, "Returns are accepted within 30 days."), (other, "Returns: OTHER-ORG-SECRET.")):
            await db.execute(
                "insert into public.knowledge_chunks (org_id, agent_id, title, content) values (%s, %s, 'Returns', %s)",
                (agent.org["id"], agent.agent["id"], content),
            )

        token = (await send(client, widget, "Hello")).json()["visitor_token"]
        online.requests.clear()
        await send(client, widget, "What about returns?", token=token)

        [chat_request] = online.requests_to("/v1/chat/completions")
        sent = json.dumps(chat_request.body["messages"])
        assert "Returns are accepted within 30 days." in sent
        assert "OTHER-ORG-SECRET" not in sent
        assert "You answer for Acme Bikes." in sent
        roles = [m["role"] for m in chat_request.body["messages"]]
        assert roles[-3:] == ["user", "assistant", "user"], "the earlier turn is in the history"
        assert [t["function"]["name"] for t in chat_request.body["tools"]] == [ESCALATE, CAPTURE_LEAD]
        assert len(online.requests_to("/v1/embeddings")) == 1

    async def test_an_agent_without_knowledge_pays_for_no_embedding(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()

        assert (await send(client, widget)).status_code == 200

        assert online.requests_to("/v1/embeddings") == []
        usage = await rows(db, "select kind from public.usage_events where org_id = %s", widget.org["id"])
        assert usage == [{"kind": "chat"}]


class TestConcurrency:
    VISITORS = 200
    ROOM_FOR = 50

    @pytest.mark.usefixtures("committed_db")
    async def test_simultaneous_visitors_never_spend_past_the_budget_and_the_rest_are_answered_gracefully(
        self,
        app: FastAPI,
        online: FakeOpenAI,
        configure: Configure,
        admin_url: str,
        direct_redis: redis.Redis,
    ) -> None:
        # The real pool, committed data, a fresh organization; each visitor from its own address.
        configure(DB_POOL_MAX_SIZE="10", DB_CONNECT_TIMEOUT_SECONDS="30")
        await close_pools()
        online.reply.prompt_tokens, online.reply.completion_tokens = 100, 20  # 27 micro-dollars an answer
        async with await AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            key = new_key()
            agent = await create_agent(admin, org, widget_key=key, allowed_origins=[ORIGIN])
            budget = self.ROOM_FOR * 27
            await admin.execute(
                "update public.organization_limits set monthly_budget_microusd = %s, burst_per_minute = 100000,"
                " widget_rpm_per_agent = 100000, widget_rpm_per_visitor = 100000 where org_id = %s",
                (budget, org["id"]),
            )
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="https://api.hiredhands.test") as http:
                    responses = await asyncio.gather(
                        *(
                            http.post(
                                f"/api/widget/{key}/chat",
                                json={"message": f"Question {i}"},
                                headers={"Origin": ORIGIN, "X-Real-IP": f"10.0.{i // 250}.{i % 250}"},
                            )
                            for i in range(self.VISITORS)
                        )
                    )
            finally:
                forget_keys(direct_redis, f"hh:rl:*:{agent['id']}*", f"hh:rl:model-burst:{org['id']}:*")

            answered = [r for r in responses if r.status_code == 200]
            unavailable = [r for r in responses if r.status_code == 503]
            assert len(answered) + len(unavailable) == self.VISITORS, {r.status_code for r in responses}
            assert all(problem(r)["type"].endswith("/agent-unavailable") for r in unavailable)
            assert all(int(r.headers["retry-after"]) > 0 for r in unavailable)
            assert 0 < len(answered) <= self.ROOM_FOR
            assert unavailable, "the budget ran out"

            period = await (
                await admin.execute("select * from public.budget_periods where org_id = %s", (org["id"],))
            ).fetchone()
            assert period is not None
            assert period["spent_microusd"] <= budget
            assert period["reserved_microusd"] == 0
            usage = await (
                await admin.execute(
                    "select outcome, count(*) as n, count(distinct conversation_id) as conversations"
                    " from public.usage_events where org_id = %s group by outcome",
                    (org["id"],),
                )
            ).fetchall()
            by_outcome = {row["outcome"]: row for row in usage}
            assert by_outcome["ok"]["n"] == by_outcome["ok"]["conversations"] == len(answered), (
                "each answer metered once"
            )
            assert by_outcome["rejected"]["n"] == len(unavailable)
            assert set(by_outcome) == {"ok", "rejected"}
            stored = await (
                await admin.execute("select count(*) as n from public.conversations where org_id = %s", (org["id"],))
            ).fetchone()
            assert stored is not None
            assert stored["n"] == len(answered), "a refused request stores nothing"
            assert len(online.requests) == len(answered), "no refused request reached the model"


# -- dependencies down ------------------------------------------------------------------------------


class UnreachableDatabase:
    """A database at a port nobody listens on: the failure happens in the network, not in our code."""

    def __init__(self) -> None:
        self.url = f"postgresql://authenticator@127.0.0.1:{closed_port()}/postgres?connect_timeout=1"

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        with map_db_errors():
            conn = await AsyncConnection.connect(self.url)
        async with conn:
            yield conn  # type: ignore[misc]


class TestDatabaseUnreachable:
    async def test_is_a_503_problem_with_retry_after_and_no_internals(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        app.dependency_overrides[get_request_database] = UnreachableDatabase

        for response in (await send(client, new_key()), await client.get(f"/api/widget/{new_key()}/config")):
            assert response.status_code == 503
            body = problem(response)
            assert body["type"].endswith("/dependency-unavailable")
            assert int(response.headers["retry-after"]) >= 1
            for leak in ("127.0.0.1", "connection", "psycopg", "Traceback"):
                assert leak not in body["detail"]


# -- tenancy of what the widget stores --------------------------------------------------------------


class TestTenancy:
    async def test_transcripts_usage_and_review_items_are_readable_by_the_right_org_only(
        self, db: Connection, online: FakeOpenAI, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        online.reply.tool_calls = [(ESCALATE, {"reason": "complaint", "summary": "late", "draft_reply": ""})]
        sent = (await send(client, widget, "My bike arrived late")).json()
        member = await add_member(db, widget.org)
        outsider_org = await create_org(db)
        outsider = await add_member(db, outsider_org, role="admin")

        queries = {
            "conversations": "select count(*) as n from public.conversations where id = %(cid)s",
            "messages": "select count(*) as n from public.messages where conversation_id = %(cid)s",
            "usage": "select count(*) as n from public.usage_events where conversation_id = %(cid)s",
            "review items": "select count(*) as n from public.review_items where conversation_id = %(cid)s",
        }
        expected = {"conversations": 1, "messages": 2, "usage": 1, "review items": 1}
        for user, visible in (
            (member, True),
            (widget.org["owner"], True),
            (outsider, False),
            (outsider_org["owner"], False),
        ):
            async with as_user(TransactionDatabase(db), user_claims(user)) as conn:
                for name, sql in queries.items():
                    row = await (await conn.execute(sql, {"cid": sent["conversation_id"]})).fetchone()
                    assert row is not None
                    assert row["n"] == (expected[name] if visible else 0), (
                        f"{name} as {'member' if visible else 'outsider'}"
                    )

    async def test_anonymous_clients_cannot_read_transcripts(
        self, db: Connection, client: httpx.AsyncClient, make_widget: Callable[..., Any]
    ) -> None:
        widget = await make_widget()
        await send(client, widget)
        await superuser(db)
        await db.execute("set local role anon")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with db.transaction():
                await db.execute("select * from public.messages")


# -- round trips ------------------------------------------------------------------------------------


class TestRoundTrips:
    @pytest.mark.parametrize(
        ("mode", "knowledge"), [("offline", False), ("offline", True), ("online", False), ("online", True)]
    )
    async def test_the_chat_path_makes_the_documented_number_of_round_trips(
        self,
        mode: str,
        knowledge: bool,
        db: Connection,
        request: pytest.FixtureRequest,
        client: httpx.AsyncClient,
        make_widget: Callable[..., Any],
        tmp_path: Any,
    ) -> None:
        if mode == "online":
            request.getfixturevalue("online")
        widget = await make_widget()
        if knowledge:
            await (await superuser(db)).execute(
                "insert into public.knowledge_chunks (org_id, agent_id, title, content) values (%s, %s, 'Repairs', %s)",
                (widget.org["id"], widget.agent["id"], "We repair e-bikes of every brand."),
            )
        token = (await send(client, widget)).json()["visitor_token"]
        trace = tmp_path / "trace.txt"

        with (
            open(trace, "w") as sink,  # noqa: ASYNC230 - a local file for libpq to write to
            counting_requests(get_redis()) as redis_requests,
        ):
            db.pgconn.trace(sink.fileno())
            db.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
            try:
                response = await send(client, widget, "Do you repair e-bikes?", token=token)
            finally:
                db.pgconn.untrace()

        assert response.status_code == 200
        assert waits_for_the_server(trace.read_text()) == EXPECTED_ROUND_TRIPS[mode, knowledge], trace.read_text()
        # The visitor's limit, then the agent's limit with the burst limit for every model call of the turn.
        assert len(redis_requests) == 2, redis_requests


# docs/widget.md explains each: one per transaction (the role and the statement pipelined, committed by the Sync).
EXPECTED_ROUND_TRIPS = {
    ("offline", False): 4,
    ("offline", True): 5,
    ("online", False): 4,
    ("online", True): 7,
}
