"""POST/GET /api/invitations, DELETE /api/invitations/{id}, and acceptance at sign-in.

Supabase Auth is a loopback server speaking its admin API (tests/fakes/supabase_auth.py), reached
by the real ``supabase`` client; the database is real (one rolled-back transaction per test). What
Supabase Auth writes to ``auth.users`` (the invited user, then the sign-in stamp) the tests write
there themselves, as Auth would.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from functions.invitations import app
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import TransactionDatabase
from tests.factories import access_token, add_member, create_org, create_user, user_claims
from tests.fakes.supabase_auth import ANON_KEY, SERVICE_ROLE_KEY, FakeAuth, running_fake_auth

Connection = AsyncConnection[DictRow]


@pytest.fixture(scope="module")
def fake_auth() -> Iterator[FakeAuth]:
    with running_fake_auth() as running:
        yield running


@pytest.fixture(autouse=True)
def _configured(fake_auth: FakeAuth, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fake_auth.reset()
    monkeypatch.setenv("SUPABASE_URL", fake_auth.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
async def client(db: Connection, log_lines: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    bodies: list[str] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items()))

    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", event_hooks={"response": [keep]}) as c:
        yield c
    app.dependency_overrides.clear()
    everything = "\n".join(bodies + log_lines)
    assert SERVICE_ROLE_KEY not in everything, "the service-role key reached a response or a log line"
    assert SERVICE_ROLE_KEY[-24:] not in everything


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    org = await create_org(db)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    org["other"] = await create_org(db)
    org["other"]["admin"] = await add_member(db, org["other"], role="admin")
    return org


def _auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token(user)}"}


async def sql(db: Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    await db.execute("reset role")
    cursor = await db.execute(query, params)
    return [dict(r) for r in await cursor.fetchall()] if cursor.description else []


async def audit_actions(db: Connection, org_id: uuid.UUID) -> list[str]:
    rows = await sql(db, "select action from public.audit_log where org_id = %s order by id", org_id)
    return [r["action"] for r in rows]


async def sign_in(db: Connection, user_id: uuid.UUID, email: str) -> None:
    """What Supabase Auth does: the invited user exists; accepting the invite stamps the sign-in."""
    await sql(
        db,
        "insert into auth.users (id, aud, role, email, raw_app_meta_data, raw_user_meta_data)"
        " values (%s, 'authenticated', 'authenticated', %s, '{}', '{}') on conflict (id) do nothing",
        user_id,
        email,
    )
    await sql(db, "update auth.users set email_confirmed_at = now(), last_sign_in_at = now() where id = %s", user_id)


async def invite(
    client: httpx.AsyncClient, user: dict[str, Any], org: dict[str, Any], email: str, role: str = "member"
) -> httpx.Response:
    return await client.post(
        "/api/invitations", json={"org_id": str(org["id"]), "email": email, "role": role}, headers=_auth(user)
    )


class TestInviteNewUser:
    async def test_supabase_sends_the_invite_and_the_membership_appears_at_sign_in(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        response = await invite(client, org["admin"], org, "New.Person@Example.test", "admin")
        assert response.status_code == 201, response.text
        invitation = response.json()
        assert invitation["status"] == "pending"
        assert invitation["email"] == "new.person@example.test"
        [call] = fake_auth.requests
        assert (call.method, call.path) == ("POST", "/auth/v1/invite")
        assert call.body["email"] == "new.person@example.test"
        assert call.body["data"] == {"invited_to_org": str(org["id"])}
        assert call.query["redirect_to"] == [get_settings().dashboard_url]
        assert call.headers["apikey"] == SERVICE_ROLE_KEY
        invited_id = uuid.UUID(fake_auth.users["new.person@example.test"]["id"])

        listed = await client.get("/api/invitations", params={"org_id": str(org["id"])}, headers=_auth(org["owner"]))
        assert [i["id"] for i in listed.json()["invitations"]] == [invitation["id"]]
        assert await sql(db, "select 1 from public.memberships where user_id = %s", invited_id) == []

        await sign_in(db, invited_id, "new.person@example.test")
        [membership] = await sql(db, "select org_id, role from public.memberships where user_id = %s", invited_id)
        assert membership == {"org_id": org["id"], "role": "admin"}
        [row] = await sql(db, "select status, accepted_at from public.invitations where id = %s", invitation["id"])
        assert row["status"] == "accepted"
        actions = await audit_actions(db, org["id"])
        assert actions[-3:] == ["invitation.created", "member.added", "invitation.accepted"]

    async def test_a_second_sign_in_changes_nothing(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        await invite(client, org["owner"], org, "twice@example.test")
        invited_id = uuid.UUID(fake_auth.users["twice@example.test"]["id"])
        await sign_in(db, invited_id, "twice@example.test")
        before = await audit_actions(db, org["id"])
        await sql(db, "update auth.users set last_sign_in_at = now() + interval '1 hour' where id = %s", invited_id)
        assert await audit_actions(db, org["id"]) == before

    async def test_an_expired_invitation_adds_nobody_and_can_be_sent_again(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        first = (await invite(client, org["owner"], org, "late@example.test")).json()
        await sql(
            db, "update public.invitations set expires_at = now() - interval '1 minute' where id = %s", first["id"]
        )
        listed = await client.get("/api/invitations", params={"org_id": str(org["id"])}, headers=_auth(org["owner"]))
        assert listed.json()["invitations"][0]["status"] == "expired"
        invited_id = uuid.UUID(fake_auth.users["late@example.test"]["id"])
        await sign_in(db, invited_id, "late@example.test")
        assert await sql(db, "select 1 from public.memberships where user_id = %s", invited_id) == []
        again = await invite(client, org["owner"], org, "late@example.test")
        assert again.status_code == 201, again.text

    async def test_a_revoked_invitation_adds_nobody(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        created = (await invite(client, org["admin"], org, "gone@example.test")).json()
        revoked = await client.delete(f"/api/invitations/{created['id']}", headers=_auth(org["admin"]))
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked"
        again = await client.delete(f"/api/invitations/{created['id']}", headers=_auth(org["admin"]))
        assert again.status_code == 409
        invited_id = uuid.UUID(fake_auth.users["gone@example.test"]["id"])
        await sign_in(db, invited_id, "gone@example.test")
        assert await sql(db, "select 1 from public.memberships where user_id = %s", invited_id) == []
        assert (await audit_actions(db, org["id"]))[-2:] == ["invitation.created", "invitation.revoked"]


class TestInviteExistingUser:
    async def test_someone_who_has_signed_in_before_is_added_at_once_without_an_email(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        user = await create_user(db)
        await sql(db, "update auth.users set last_sign_in_at = now() where id = %s", user["id"])
        response = await invite(client, org["owner"], org, user["email"].upper(), "admin")
        assert response.status_code == 201, response.text
        assert response.json()["status"] == "accepted"
        assert fake_auth.requests == [], "no invite email for an existing account"
        [membership] = await sql(
            db, "select role from public.memberships where org_id = %s and user_id = %s", org["id"], user["id"]
        )
        assert membership["role"] == "admin"
        assert (await audit_actions(db, org["id"]))[-3:] == [
            "invitation.created",
            "member.added",
            "invitation.accepted",
        ]

    async def test_a_member_already_is_a_409(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        response = await invite(client, org["owner"], org, org["member"]["email"])
        assert response.status_code == 409

    async def test_a_pending_invitation_is_not_sent_twice(
        self, client: httpx.AsyncClient, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        assert (await invite(client, org["owner"], org, "dup@example.test")).status_code == 201
        assert (await invite(client, org["admin"], org, "DUP@example.test")).status_code == 409
        assert len(fake_auth.requests) == 1


class TestSupabaseFailures:
    @pytest.mark.parametrize(
        ("failure", "status"),
        [
            ((429, "over_email_send_rate_limit"), 503),
            ((500, "unexpected_failure"), 503),
            ((503, "x"), 503),
            ((422, "email_exists"), 422),
            ((400, "validation_failed"), 422),
        ],
    )
    async def test_a_refusal_stores_nothing_and_says_so_in_our_words(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        fake_auth: FakeAuth,
        failure: tuple[int, str],
        status: int,
    ) -> None:
        fake_auth.fail_with = failure
        response = await invite(client, org["owner"], org, "fails@example.test")
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "failure requested by the test" not in response.text, "Supabase's message is not passed on"
        assert await sql(db, "select 1 from public.invitations where org_id = %s", org["id"]) == []

    async def test_unconfigured_is_a_503(
        self, client: httpx.AsyncClient, org: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "")
        get_settings.cache_clear()
        assert (await invite(client, org["owner"], org, "x@example.test")).status_code == 503

    async def test_supabase_down_is_a_503(
        self, client: httpx.AsyncClient, org: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from tests.factories import closed_port

        monkeypatch.setenv("SUPABASE_URL", f"http://127.0.0.1:{closed_port()}")
        get_settings.cache_clear()
        assert (await invite(client, org["owner"], org, "x@example.test")).status_code == 503


class TestAttackers:
    async def test_a_member_cannot_invite_and_nothing_is_sent(
        self, client: httpx.AsyncClient, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        response = await invite(client, org["member"], org, "friend@example.test")
        assert response.status_code == 403
        assert fake_auth.requests == []

    @pytest.mark.parametrize("inviter", ["admin"])
    async def test_an_admin_cannot_invite_an_owner(
        self, client: httpx.AsyncClient, org: dict[str, Any], fake_auth: FakeAuth, inviter: str
    ) -> None:
        response = await invite(client, org[inviter], org, "boss@example.test", "owner")
        assert response.status_code == 403
        assert "above your own role" in response.json()["detail"]
        assert fake_auth.requests == []

    async def test_another_tenants_admin_cannot_invite_list_or_revoke(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], fake_auth: FakeAuth
    ) -> None:
        outsider = org["other"]["admin"]
        assert (await invite(client, outsider, org, "spy@example.test", "admin")).status_code == 404
        assert fake_auth.requests == []
        created = (await invite(client, org["owner"], org, "real@example.test")).json()
        listed = await client.get("/api/invitations", params={"org_id": str(org["id"])}, headers=_auth(outsider))
        assert listed.status_code == 404
        assert "real@example.test" not in listed.text
        assert (await client.delete(f"/api/invitations/{created['id']}", headers=_auth(outsider))).status_code == 404
        [row] = await sql(db, "select status from public.invitations where id = %s", created["id"])
        assert row["status"] == "pending"

    async def test_a_member_cannot_list_or_revoke(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        created = (await invite(client, org["owner"], org, "m@example.test")).json()
        assert (
            await client.get("/api/invitations", params={"org_id": str(org["id"])}, headers=_auth(org["member"]))
        ).status_code == 403
        assert (
            await client.delete(f"/api/invitations/{created['id']}", headers=_auth(org["member"]))
        ).status_code == 404

    async def test_an_admin_cannot_revoke_an_owner_invitation(
        self, client: httpx.AsyncClient, org: dict[str, Any]
    ) -> None:
        created = (await invite(client, org["owner"], org, "co-owner@example.test", "owner")).json()
        response = await client.delete(f"/api/invitations/{created['id']}", headers=_auth(org["admin"]))
        assert response.status_code == 403

    async def test_an_anon_key_or_no_session_is_a_401(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        body = {"org_id": str(org["id"]), "email": "a@example.test"}
        assert (await client.post("/api/invitations", json=body)).status_code == 401
        headers = {"Authorization": f"Bearer {ANON_KEY}"}
        assert (await client.post("/api/invitations", json=body, headers=headers)).status_code == 401
        anon = access_token(org["owner"], role="anon")
        assert (
            await client.post("/api/invitations", json=body, headers={"Authorization": f"Bearer {anon}"})
        ).status_code == 401

    async def test_clients_cannot_write_invitations_directly(self, db: Connection, org: dict[str, Any]) -> None:
        import psycopg

        await db.execute("set local role authenticated")
        await db.execute(
            "select set_config('request.jwt.claims', %s, true)", (__import__("json").dumps(user_claims(org["owner"])),)
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with db.transaction():
                await db.execute(
                    "insert into public.invitations (org_id, email, role, expires_at)"
                    " values (%s, 'x@example.test', 'owner', now() + interval '1 day')",
                    (org["id"],),
                )

    @pytest.mark.parametrize("body", [{"email": "not-an-email"}, {"role": "superuser"}, {"extra": 1}])
    async def test_bad_bodies_are_a_422(
        self, client: httpx.AsyncClient, org: dict[str, Any], body: dict[str, Any]
    ) -> None:
        payload = {"org_id": str(org["id"]), "email": "ok@example.test", **body}
        response = await client.post("/api/invitations", json=payload, headers=_auth(org["owner"]))
        assert response.status_code == 422


class TestMembershipAudit:
    async def test_role_changes_and_removals_from_the_dashboard_are_audited(
        self, db: Connection, org: dict[str, Any]
    ) -> None:
        import json

        await db.execute("set local role authenticated")
        await db.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(user_claims(org["admin"])),))
        await db.execute(
            "update public.memberships set role = 'admin' where org_id = %s and user_id = %s",
            (org["id"], org["member"]["id"]),
        )
        await db.execute(
            "delete from public.memberships where org_id = %s and user_id = %s", (org["id"], org["member"]["id"])
        )
        rows = await sql(
            db,
            "select action, actor, actor_user_id, target_id, details from public.audit_log"
            " where org_id = %s and action in ('member.role_changed', 'member.removed') order by id",
            org["id"],
        )
        assert [r["action"] for r in rows] == ["member.role_changed", "member.removed"]
        assert rows[0]["details"] == {"from_role": "member", "to_role": "admin"}
        assert all(r["actor_user_id"] == org["admin"]["id"] and r["actor"] == "authenticated" for r in rows)
        assert rows[1]["target_id"] == str(org["member"]["id"])
