"""Every security-relevant action writes an audit-log row.

``ACTIONS`` lists them, each with a scenario that performs it through its real entry point (the
domain function an API route calls, the SQL function or table the dashboard uses, the webhook
handler, the worker), against the real database and loopback fakes of every third party. A
scenario whose action leaves no ``audit_log`` row of that name for the organization fails. A
second test reads the source for audit actions written by server code, so an action added later
without a scenario here fails too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from shared.audit.export import open_export
from shared.billing.schemas import StripeEvent, SubscriptionState
from shared.billing.webhooks import apply_subscription
from shared.connections.rotate import rotate_credentials
from shared.connections.schemas import ConnectionCreate
from shared.connections.service import create_connection, delete_connection, verify_connection
from shared.crypto import parse_keys
from shared.db.session import as_service
from shared.egress import EgressPolicy
from shared.gateway import ChatMessage, chat, close_clients
from shared.gateway.keys import ModelKeyEnvironment, model_key_environment
from shared.invitations.schemas import InvitationCreate
from shared.invitations.service import invite, revoke
from shared.model_keys import ModelKeySave, ModelKeySettings, remove, save, update_settings
from shared.redis import close_redis
from shared.settings import get_settings
from tests.conftest import Connection, TransactionDatabase
from tests.factories import add_member, create_agent, create_org, user_claims
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai
from tests.fakes.providers import Fakes, running_fakes
from tests.fakes.stripe_api import event, subscription
from tests.fakes.supabase_auth import SERVICE_ROLE_KEY, FakeAuth, running_fake_auth

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class World:
    db: Connection
    org: dict[str, Any]
    providers: Fakes
    auth: FakeAuth
    openai: FakeOpenAI

    @property
    def tdb(self) -> TransactionDatabase:
        return TransactionDatabase(self.db)

    def claims(self, who: str = "admin") -> dict[str, Any]:
        return user_claims(self.org[who])

    async def as_user(self, who: str, statement: str, *params: Any) -> None:
        await self.db.execute("set local role authenticated")
        await self.db.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(self.claims(who)),))
        await self.db.execute(statement, params)
        await self.db.execute("reset role")

    async def connection(self, state: str = "active") -> uuid.UUID:
        body = TypeAdapter(ConnectionCreate).validate_python(
            {
                "org_id": str(self.org["id"]),
                "kind": "slack_webhook",
                "name": "Support",
                "webhook_url": self.providers.slack.webhook(state),
            }
        )
        created = await create_connection(self.tdb, self.claims(), body, env=self.providers.env, request_id=None)
        return created.id

    async def model_key(self) -> None:
        body = ModelKeySave(org_id=self.org["id"], api_key=self.openai.api_key, base_url=self.openai.base_url)
        await save(self.tdb, self.claims(), body, env=model_key_environment.get(), request_id=None)


async def _rotate_widget_key(w: World) -> None:
    agent = await create_agent(w.db, w.org)
    await w.as_user("admin", "select public.rotate_widget_key(%s)", agent["id"])


async def _connection_created(w: World) -> None:
    await w.connection()


async def _connection_verified(w: World) -> None:
    await verify_connection(w.tdb, w.claims(), await w.connection(), env=w.providers.env, request_id=None)


async def _connection_broken(w: World) -> None:
    connection_id = await w.connection()
    for path in w.providers.slack.hooks:
        w.providers.slack.hooks[path] = "revoked"
    await verify_connection(w.tdb, w.claims(), connection_id, env=w.providers.env, request_id=None)


async def _connection_deleted(w: World) -> None:
    await delete_connection(w.tdb, w.claims(), await w.connection(), request_id=None)


async def _connection_credentials_resealed(w: World) -> None:
    await w.connection()
    await _credentials_resealed(w)


async def _credentials_resealed(w: World) -> None:
    current = get_settings().credential_keys.get_secret_value()
    new_key = base64.b64encode(hashlib.sha256(b"the next credential key").digest()).decode()
    await rotate_credentials(w.tdb, keyring=parse_keys(f"k2:{new_key},{current}"))


async def _member_added(w: World) -> None:
    newcomer = await add_member(w.db, w.org["other"])  # a user who exists, added by an admin
    await w.as_user(
        "admin",
        "insert into public.memberships (org_id, user_id, role) values (%s, %s, 'member')",
        w.org["id"],
        newcomer["id"],
    )


async def _member_role_changed(w: World) -> None:
    await w.as_user(
        "admin",
        "update public.memberships set role = 'admin' where org_id = %s and user_id = %s",
        w.org["id"],
        w.org["member"]["id"],
    )


async def _member_removed(w: World) -> None:
    await w.as_user(
        "admin", "delete from public.memberships where org_id = %s and user_id = %s", w.org["id"], w.org["member"]["id"]
    )


async def _invite(w: World, email: str) -> uuid.UUID:
    created = await invite(w.tdb, w.claims(), InvitationCreate(org_id=w.org["id"], email=email), request_id=None)
    return created.id


async def _invitation_created(w: World) -> None:
    await _invite(w, f"new-{uuid.uuid4().hex[:8]}@example.test")


async def _invitation_revoked(w: World) -> None:
    invitation_id = await _invite(w, f"new-{uuid.uuid4().hex[:8]}@example.test")
    await revoke(w.tdb, w.claims(), invitation_id, request_id=None)


async def _invitation_accepted(w: World) -> None:
    email = f"new-{uuid.uuid4().hex[:8]}@example.test"
    await _invite(w, email)
    user_id = w.auth.users[email]["id"]
    await w.db.execute("reset role")
    await w.db.execute(
        "insert into auth.users (id, aud, role, email) values (%s, 'authenticated', 'authenticated', %s)",
        (user_id, email),
    )
    await w.db.execute("update auth.users set last_sign_in_at = now() where id = %s", (user_id,))


async def _model_key_set(w: World) -> None:
    await w.model_key()


async def _model_key_rotated(w: World) -> None:
    await w.model_key()
    await w.model_key()


async def _model_key_fallback_changed(w: World) -> None:
    await w.model_key()
    await update_settings(
        w.tdb, w.claims(), ModelKeySettings(org_id=w.org["id"], on_key_failure="platform"), request_id=None
    )


async def _model_key_removed(w: World) -> None:
    await w.model_key()
    await remove(w.tdb, w.claims(), w.org["id"], request_id=None)


async def _model_key_broken(w: World) -> None:
    await w.model_key()
    key, w.openai.api_key = w.openai.api_key, "sk-revoked"
    try:
        await w.db.execute("reset role")
        await w.db.execute(
            "update public.organization_limits set burst_per_minute = 1000 where org_id = %s", (w.org["id"],)
        )
        with pytest.raises(Exception):  # noqa: B017, PT011 - the call fails; the audit row is what is checked
            await chat(
                w.tdb,
                org_id=w.org["id"],
                agent_id=None,
                conversation_id=None,
                model="gpt-4o-mini",
                messages=[ChatMessage("user", "hello")],
                request_id="req_coverage",
            )
    finally:
        w.openai.api_key = key


async def _model_key_resealed(w: World) -> None:
    await w.model_key()
    await _credentials_resealed(w)


async def _billing_plan_changed(w: World) -> None:
    sub = subscription(customer="cus_coverage" + uuid.uuid4().hex[:8], org_id=w.org["id"])
    stripe_event = StripeEvent.model_validate(json.loads(event("customer.subscription.updated", sub)))
    async with as_service(w.tdb) as conn:
        await apply_subscription(
            conn,
            w.org["id"],
            SubscriptionState.from_stripe(sub),
            datetime.now(UTC),
            event=stripe_event,
            request_id=None,
        )


async def _audit_exported(w: World) -> None:
    export = await open_export(
        w.tdb,
        w.claims(),
        org_id=w.org["id"],
        start=datetime.now(UTC) - timedelta(days=1),
        end=None,
        fmt="ndjson",
        request_id=None,
    )
    async for _ in export.body:
        pass


Scenario = Callable[[World], Awaitable[None]]
ACTIONS: dict[str, Scenario] = {
    "agent.widget_key_rotated": _rotate_widget_key,
    "connection.created": _connection_created,
    "connection.verified": _connection_verified,
    "connection.broken": _connection_broken,
    "connection.deleted": _connection_deleted,
    "connection.credentials_resealed": _connection_credentials_resealed,
    "member.added": _member_added,
    "member.role_changed": _member_role_changed,
    "member.removed": _member_removed,
    "invitation.created": _invitation_created,
    "invitation.accepted": _invitation_accepted,
    "invitation.revoked": _invitation_revoked,
    "model_key.set": _model_key_set,
    "model_key.rotated": _model_key_rotated,
    "model_key.fallback_changed": _model_key_fallback_changed,
    "model_key.removed": _model_key_removed,
    "model_key.broken": _model_key_broken,
    "model_key.resealed": _model_key_resealed,
    "billing.plan_changed": _billing_plan_changed,
    "audit_log.export_started": _audit_exported,
    "audit_log.exported": _audit_exported,
}


@pytest.fixture(scope="module")
def providers() -> Iterator[Fakes]:
    with running_fakes() as fakes:
        yield fakes


@pytest.fixture(scope="module")
def fake_auth() -> Iterator[FakeAuth]:
    with running_fake_auth() as fake:
        yield fake


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture
async def world(
    db: Connection, providers: Fakes, fake_auth: FakeAuth, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> Any:
    providers.reset()
    fake_auth.reset()
    fake_openai.reset()
    monkeypatch.setenv("SUPABASE_URL", fake_auth.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    get_settings.cache_clear()
    port = httpx.URL(fake_openai.base_url).port
    token = model_key_environment.set(
        ModelKeyEnvironment(EgressPolicy(purpose="model-provider", allow_addresses=frozenset({f"127.0.0.1:{port}"})))
    )
    org = await create_org(db)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    org["other"] = await create_org(db)
    yield World(db, org, providers, fake_auth, fake_openai)
    model_key_environment.reset(token)
    await close_clients()
    await close_redis()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.mark.parametrize("action", sorted(ACTIONS))
async def test_the_action_writes_an_audit_row(world: World, action: str) -> None:
    await world.db.execute("reset role")
    before = await (await world.db.execute("select coalesce(max(id), 0) as id from public.audit_log")).fetchone()
    await ACTIONS[action](world)
    await world.db.execute("reset role")
    rows = await (
        await world.db.execute(
            "select actor, actor_user_id from public.audit_log where org_id = %s and action = %s and id > %s",
            (world.org["id"], action, before["id"] if before else 0),
        )
    ).fetchall()
    assert rows, f"{action} wrote no audit-log row"


_PYTHON_ACTION = re.compile(r"""action=(?:"([a-z_]+\.[a-z_]+)"|"([a-z_]+\.[a-z_]+)" if)""")
_SQL_ACTION = re.compile(r"'((?:agent|connection|member|invitation|model_key|billing|audit_log)\.[a-z_]+)'")


def test_every_audit_action_in_the_code_has_a_scenario() -> None:
    found: set[str] = set()
    for path in (ROOT / "shared").rglob("*.py"):
        for match in _PYTHON_ACTION.finditer(path.read_text()):
            found.add(match[1] or match[2])
        found.update(re.findall(r'"((?:connection|model_key|invitation|audit_log)\.[a-z_]+)"', path.read_text()))
        found.update(_SQL_ACTION.findall(path.read_text()))  # SQL statements inside Python modules
    for path in (ROOT / "supabase" / "migrations").glob("*.sql"):
        found.update(_SQL_ACTION.findall(path.read_text()))
    found.discard("audit_log.export_incomplete")  # the client went away mid-export: tested in test_audit_export
    assert found, "the search found no actions at all"
    assert sorted(found - set(ACTIONS)) == [], "audit actions without a scenario in ACTIONS"
