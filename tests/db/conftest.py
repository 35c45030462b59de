"""A tenant with a row in every table, and helpers to act as each API role, as PostgREST does."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from tests.factories import add_member, create_agent, create_org, user_claims

Connection = AsyncConnection[DictRow]

EXPOSED_SCHEMAS = ("public", "graphql_public")


@asynccontextmanager
async def acting_as(conn: Connection, role: str, user: dict[str, Any] | None = None) -> AsyncIterator[Connection]:
    """Switch role and claims inside a savepoint, exactly as PostgREST does for a request.

    The savepoint is rolled back afterwards, so an expected error doesn't abort the test's
    transaction and nothing the role wrote survives into the next assertion.
    """
    claims = user_claims(user) if user else {}
    async with conn.transaction(force_rollback=True):
        await conn.execute(
            "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
            (role, json.dumps({**claims, "role": role})),
        )
        yield conn


async def exposed_tables(conn: Connection) -> list[str]:
    await conn.execute("reset role")
    rows = await (
        await conn.execute(
            """
            select format('%%I.%%I', n.nspname, c.relname) as name
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where c.relkind in ('r', 'p') and n.nspname = any(%s)
            order by 1
            """,
            (list(EXPOSED_SCHEMAS),),
        )
    ).fetchall()
    return [r["name"] for r in rows]


@pytest.fixture
async def tenant(db: Connection) -> dict[str, Any]:
    """Organization A with one row in every tenant table (written as the superuser)."""
    org = await create_org(db)
    admin = await add_member(db, org, role="admin")
    member = await add_member(db, org, role="member")
    agent = await create_agent(db, org, widget_key="hh_wk_" + uuid.uuid4().hex + uuid.uuid4().hex[:16])
    org_id, agent_id = org["id"], agent["id"]

    async def one(query: str, params: dict[str, Any]) -> Any:
        row = await (await db.execute(query, params)).fetchone()
        assert row is not None
        return next(iter(row.values()))

    p = {"org": org_id, "agent": agent_id}
    p["source"] = await one(
        "insert into public.knowledge_sources (org_id, agent_id, kind, url, title)"
        " values (%(org)s, %(agent)s, 'website', 'https://a.example/', 'Site') returning id",
        p,
    )
    p["scan"] = await one(
        "insert into public.scans (org_id, agent_id, source_id, start_url)"
        " values (%(org)s, %(agent)s, %(source)s, 'https://a.example/') returning id",
        p,
    )
    await db.execute(
        "insert into public.knowledge_chunks (org_id, agent_id, source_id, url, title, content)"
        " values (%(org)s, %(agent)s, %(source)s, 'https://a.example/hours', 'Hours', 'Open 9 to 5')",
        p,
    )
    p["conversation"] = await one(
        "insert into public.conversations (org_id, agent_id, visitor_id)"
        " values (%(org)s, %(agent)s, 'v1') returning id",
        p,
    )
    await db.execute(
        "insert into public.messages (org_id, conversation_id, role, content)"
        " values (%(org)s, %(conversation)s, 'visitor', 'hello')",
        p,
    )
    p["connection"] = await one(
        "insert into public.connections (org_id, kind, name, secret_hint) values (%(org)s, 'webhook', 'Hook', '…ab12')"
        " returning id",
        p,
    )
    await db.execute(
        "insert into secrets.connection_credentials (connection_id, org_id, key_id, nonce, ciphertext)"
        " values (%(connection)s, %(org)s, 'k1', '\\x00', '\\x00')",
        p,
    )
    # Creates its status history row and a delivery to the connection, by trigger.
    p["review_item"] = await one(
        "insert into public.review_items (org_id, agent_id, conversation_id, kind, title)"
        " values (%(org)s, %(agent)s, %(conversation)s, 'escalation', 'Needs a human') returning id",
        p,
    )
    await db.execute(
        "insert into public.usage_events (org_id, agent_id, kind, model, outcome, request_id)"
        " values (%(org)s, %(agent)s, 'chat', 'offline', 'ok', 'req_1')",
        p,
    )
    await db.execute("set local role service_role")
    await db.execute("select private.reserve_budget(%(org)s, 1000)", p)
    await db.execute("reset role")
    await db.execute(
        "insert into public.billing_accounts (org_id, stripe_customer_id) values (%(org)s, %(cus)s)",
        {**p, "cus": "cus_" + uuid.uuid4().hex[:14]},
    )
    await db.execute(
        "insert into public.stripe_events (id, type, org_id, event_created, object_type)"
        " values (%(evt)s, 'invoice.paid', %(org)s, now(), 'invoice')",
        {**p, "evt": "evt_" + uuid.uuid4().hex},
    )
    await db.execute(
        "insert into public.audit_log (org_id, actor, action) values (%(org)s, 'service', 'test.created')", p
    )
    await db.execute(
        "insert into public.invitations (org_id, email, role, expires_at)"
        " values (%(org)s, 'invitee@a.example', 'member', now() + interval '7 days')",
        p,
    )
    await db.execute(
        "insert into public.model_keys (org_id, sealed_id, base_url, key_hint)"
        " values (%(org)s, gen_random_uuid(), 'https://llm.a.example/v1', 'ab12')",
        p,
    )
    await db.execute(
        "insert into secrets.model_key_credentials (org_id, key_id, nonce, ciphertext)"
        " values (%(org)s, 'k1', '\\x000000000000000000000000', '\\x00')",
        p,
    )
    return {"org": org, "admin": admin, "member": member, "owner": org["owner"], "ids": p}


@pytest.fixture
async def outsider_admin(db: Connection, tenant: dict[str, Any]) -> dict[str, Any]:
    """The owner of another organization B: as privileged as possible, just not in A."""
    other = await create_org(db)
    return dict(other["owner"])


@contextmanager
def raises_sqlstate(sqlstate: str, match: str | None = None) -> Iterator[None]:
    """Like pytest.raises, for the SQLSTATEs our own triggers raise (class HH)."""
    with pytest.raises(psycopg.Error, match=match) as caught:
        yield
    assert caught.value.sqlstate == sqlstate, f"expected SQLSTATE {sqlstate}, got {caught.value.sqlstate}"
