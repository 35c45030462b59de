"""Bring your own key: the admin API (PUT/GET/PATCH/DELETE /api/model-key) and the gateway using it.

Two loopback OpenAI-compatible servers play the platform's provider and the organization's own;
the database and Redis are real (one rolled-back transaction per test). The organization's base
URL is reached through the egress guard with a test policy that allows exactly the loopback
server's address (set in code, as ``PRODUCTION`` is); one test uses the production policy.
Every response body and log line is searched for every key the tests handed over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from functions.model_key import app
from shared.egress import EgressPolicy
from shared.errors import BudgetExhausted, ModelUnavailable
from shared.gateway import ChatMessage, chat, close_clients, embed
from shared.gateway.keys import ModelKeyBroken, ModelKeyEnvironment, get_model_key_environment, model_key_environment
from shared.redis import close_redis
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import TransactionDatabase, forget_keys
from tests.factories import access_token, add_member, create_org
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

Connection = AsyncConnection[DictRow]
ISSUED: list[str] = []


@pytest.fixture(scope="module")
def platform_fake() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture(scope="module")
def org_fake() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        ISSUED.append(fake.api_key)
        yield fake


@pytest.fixture
def environment(org_fake: FakeOpenAI) -> Iterator[ModelKeyEnvironment]:
    """The egress policy for customer base URLs, widened in code to exactly the loopback fake."""
    port = httpx.URL(org_fake.base_url).port
    env = ModelKeyEnvironment(EgressPolicy(purpose="model-provider", allow_addresses=frozenset({f"127.0.0.1:{port}"})))
    token = model_key_environment.set(env)
    yield env
    model_key_environment.reset(token)


@pytest.fixture
async def configured(
    monkeypatch: pytest.MonkeyPatch, platform_fake: FakeOpenAI, org_fake: FakeOpenAI, redis_bridge: tuple[str, str]
) -> AsyncIterator[None]:
    platform_fake.reset()
    org_fake.reset()
    monkeypatch.setenv("OPENAI_API_KEY", platform_fake.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", platform_fake.base_url)
    monkeypatch.setenv("MODEL_TIMEOUT_SECONDS", "5")
    get_settings.cache_clear()
    yield
    await close_clients()
    await close_redis()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
async def client(
    db: Connection, environment: ModelKeyEnvironment, configured: None, log_lines: list[str]
) -> AsyncIterator[httpx.AsyncClient]:
    bodies: list[str] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(response.text + "\n".join(f"{k}: {v}" for k, v in response.headers.items()))

    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    app.dependency_overrides[get_model_key_environment] = lambda: environment
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", event_hooks={"response": [keep]}) as c:
        yield c
    app.dependency_overrides.clear()
    everything = "\n".join(bodies + log_lines)
    for secret in ISSUED:
        assert secret not in everything, "a model key reached a response or a log line"


@pytest.fixture
async def org(db: Connection, direct_redis: redis.Redis) -> AsyncIterator[dict[str, Any]]:
    org = await create_org(db)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    org["other"] = await create_org(db)
    await db.execute("reset role")
    await db.execute("update public.organization_limits set burst_per_minute = 1000 where org_id = %s", (org["id"],))
    yield org
    forget_keys(direct_redis, f"*{org['id']}*")


def _auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token(user)}"}


async def sql(db: Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    await db.execute("reset role")
    cursor = await db.execute(query, params)
    return [dict(r) for r in await cursor.fetchall()] if cursor.description else []


async def put_key(
    client: httpx.AsyncClient, user: dict[str, Any], org: dict[str, Any], key: str, base_url: str, **extra: Any
) -> httpx.Response:
    body = {"org_id": str(org["id"]), "api_key": key, "base_url": base_url, **extra}
    return await client.put("/api/model-key", json=body, headers=_auth(user))


async def one_chat(db: Connection, org: dict[str, Any]) -> Any:
    return await chat(
        TransactionDatabase(db),
        org_id=org["id"],
        agent_id=None,
        conversation_id=None,
        model="gpt-4o-mini",
        messages=[ChatMessage("user", "Do you repair e-bikes?")],
        request_id=f"req_{uuid.uuid4().hex[:12]}",
    )


class TestSaving:
    async def test_a_working_key_is_checked_live_sealed_and_only_hinted(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        response = await put_key(client, org["admin"], org, org_fake.api_key, org_fake.base_url + "/")
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["key_hint"] == "…" + org_fake.api_key[-4:]
        assert out["base_url"] == org_fake.base_url
        assert (out["status"], out["on_key_failure"]) == ("active", "refuse")
        [check] = org_fake.requests
        assert (check.path, check.headers["authorization"]) == ("/v1/models", f"Bearer {org_fake.api_key}")
        [sealed] = await sql(
            db, "select key_id, nonce, ciphertext from secrets.model_key_credentials where org_id = %s", org["id"]
        )
        assert org_fake.api_key.encode() not in bytes(sealed["ciphertext"])
        [audit] = await sql(
            db,
            "select action, actor_user_id, details from public.audit_log"
            " where org_id = %s and action like 'model_key.%%'",
            org["id"],
        )
        assert audit["action"] == "model_key.set"
        assert audit["actor_user_id"] == org["admin"]["id"]
        assert org_fake.api_key not in json.dumps(audit["details"])
        read = await client.get("/api/model-key", params={"org_id": str(org["id"])}, headers=_auth(org["owner"]))
        assert read.json() == out

    async def test_a_refused_key_is_not_stored(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        wrong = "sk-wrong-" + uuid.uuid4().hex
        ISSUED.append(wrong)
        response = await put_key(client, org["owner"], org, wrong, org_fake.base_url)
        assert response.status_code == 422
        assert response.json()["type"].endswith("model-key-check-failed")
        assert "HTTP 401" in response.json()["detail"]
        assert await sql(db, "select 1 from public.model_keys where org_id = %s", org["id"]) == []

    async def test_a_server_that_is_not_openai_compatible_is_refused(
        self, client: httpx.AsyncClient, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        response = await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url + "/nothing-here")
        assert response.status_code == 422

    @pytest.mark.parametrize(
        "base_url",
        ["http://169.254.169.254/latest", "http://10.0.0.5/v1", "http://localhost:5432/v1", "https://127.0.0.1/v1"],
    )
    async def test_a_base_url_the_egress_guard_refuses_is_not_stored_and_never_contacted(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], org_fake: FakeOpenAI, base_url: str
    ) -> None:
        from shared.gateway.keys import PRODUCTION

        app.dependency_overrides[get_model_key_environment] = lambda: PRODUCTION
        response = await put_key(client, org["owner"], org, org_fake.api_key, base_url)
        assert response.status_code == 422, response.text
        assert "egress-denied" in response.json()["type"]
        assert org_fake.requests == []
        assert await sql(db, "select 1 from public.model_keys where org_id = %s", org["id"]) == []

    async def test_production_refuses_a_plain_http_base_url(
        self, client: httpx.AsyncClient, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        from shared.gateway.keys import PRODUCTION

        app.dependency_overrides[get_model_key_environment] = lambda: PRODUCTION
        response = await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        assert response.status_code == 422
        assert org_fake.requests == []

    async def test_rotation_replaces_the_key_and_is_audited_with_both_hints(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        first = org_fake.api_key
        assert (await put_key(client, org["owner"], org, first, org_fake.base_url)).status_code == 200
        org_fake.api_key = second = f"sk-rotated-{uuid.uuid4().hex}"
        ISSUED.append(second)
        try:
            response = await put_key(client, org["owner"], org, second, org_fake.base_url)
            assert response.status_code == 200
            assert response.json()["key_hint"] == "…" + second[-4:]
            rows = await sql(
                db,
                "select action, details from public.audit_log where org_id = %s"
                " and action like 'model_key.%%' order by id",
                org["id"],
            )
            assert [r["action"] for r in rows] == ["model_key.set", "model_key.rotated"]
            assert rows[1]["details"]["previous_key_hint"] == first[-4:]
            result = await one_chat(db, org)
            assert org_fake.requests_to("/v1/chat/completions")[-1].headers["authorization"] == f"Bearer {second}"
            assert result.content
        finally:
            org_fake.api_key = first

    async def test_removal_goes_back_to_the_platform_key(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        platform_fake: FakeOpenAI,
    ) -> None:
        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        removed = await client.delete("/api/model-key", params={"org_id": str(org["id"])}, headers=_auth(org["admin"]))
        assert removed.status_code == 204
        assert await sql(db, "select 1 from secrets.model_key_credentials where org_id = %s", org["id"]) == []
        await one_chat(db, org)
        assert len(platform_fake.requests_to("/v1/chat/completions")) == 1
        [usage] = await sql(db, "select key_source from public.usage_events where org_id = %s", org["id"])
        assert usage["key_source"] == "platform"
        actions = await sql(
            db,
            "select action from public.audit_log where org_id = %s and action like 'model_key.%%' order by id",
            org["id"],
        )
        assert [a["action"] for a in actions] == ["model_key.set", "model_key.removed"]


class TestGateway:
    async def test_chat_and_embeddings_use_the_organizations_key_with_the_same_budget_and_metering(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        platform_fake: FakeOpenAI,
    ) -> None:
        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        result = await one_chat(db, org)
        vectors = await embed(
            TransactionDatabase(db),
            org_id=org["id"],
            agent_id=None,
            scan_id=None,
            texts=["one", "two"],
            request_id="req_embed",
        )
        assert vectors is not None
        assert len(vectors) == 2
        assert platform_fake.requests == [], "the platform key paid for nothing"
        [chat_call] = org_fake.requests_to("/v1/chat/completions")
        assert chat_call.headers["authorization"] == f"Bearer {org_fake.api_key}"
        assert len(org_fake.requests_to("/v1/embeddings")) == 1
        rows = await sql(
            db,
            "select kind, key_source, outcome, cost_microusd from public.usage_events where org_id = %s order by id",
            org["id"],
        )
        assert [(r["kind"], r["key_source"], r["outcome"]) for r in rows] == [
            ("chat", "organization", "ok"),
            ("embedding", "organization", "ok"),
        ]
        assert rows[0]["cost_microusd"] == result.cost_microusd > 0
        [period] = await sql(
            db, "select spent_microusd, reserved_microusd from public.budget_periods where org_id = %s", org["id"]
        )
        assert period["spent_microusd"] == sum(r["cost_microusd"] for r in rows)
        assert period["reserved_microusd"] == 0

    async def test_the_budget_still_caps_an_organization_on_its_own_key(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        await sql(db, "update public.organization_limits set monthly_budget_microusd = 1 where org_id = %s", org["id"])
        with pytest.raises(BudgetExhausted):
            await one_chat(db, org)
        assert org_fake.requests_to("/v1/chat/completions") == []

    async def test_the_egress_guard_is_applied_on_every_call(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        log_lines: list[str],
    ) -> None:
        from shared.gateway.keys import PRODUCTION

        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        token = model_key_environment.set(PRODUCTION)  # the loopback allowance is gone at call time
        try:
            with pytest.raises(ModelUnavailable):
                await one_chat(db, org)
        finally:
            model_key_environment.reset(token)
        assert org_fake.requests_to("/v1/chat/completions") == []
        assert any('"decision_reason":"model-egress-denied"' in line for line in log_lines)
        [key] = await sql(db, "select status from public.model_keys where org_id = %s", org["id"])
        assert key["status"] == "active", "a refused destination says nothing about the key"

    async def test_a_revoked_key_is_marked_broken_then_refused_by_default(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        platform_fake: FakeOpenAI,
    ) -> None:
        key = org_fake.api_key
        await put_key(client, org["owner"], org, key, org_fake.base_url)
        org_fake.api_key = "sk-someone-revoked-it"
        try:
            with pytest.raises(ModelUnavailable):
                await one_chat(db, org)
            [row] = await sql(
                db, "select status, status_reason, broken_at from public.model_keys where org_id = %s", org["id"]
            )
            assert (row["status"], row["status_reason"]) == ("broken", "model-status-401")
            [audit] = await sql(
                db,
                "select actor, details from public.audit_log where org_id = %s and action = 'model_key.broken'",
                org["id"],
            )
            assert audit["details"]["on_key_failure"] == "refuse"
            sent = len(org_fake.requests)
            with pytest.raises(ModelKeyBroken):
                await one_chat(db, org)
            assert len(org_fake.requests) == sent, "a broken key is not tried again"
            assert platform_fake.requests == [], "refuse means refuse: the platform key is not used"
        finally:
            org_fake.api_key = key
        # An admin saves a working key: active again.
        assert (await put_key(client, org["owner"], org, key, org_fake.base_url)).json()["status"] == "active"
        assert (await one_chat(db, org)).content

    async def test_with_the_platform_fallback_a_broken_key_falls_back_and_usage_says_so(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        platform_fake: FakeOpenAI,
    ) -> None:
        key = org_fake.api_key
        await put_key(client, org["owner"], org, key, org_fake.base_url)
        patched = await client.patch(
            "/api/model-key", json={"org_id": str(org["id"]), "on_key_failure": "platform"}, headers=_auth(org["admin"])
        )
        assert patched.json()["on_key_failure"] == "platform"
        org_fake.api_key = "sk-someone-revoked-it"
        try:
            with pytest.raises(ModelUnavailable):
                await one_chat(db, org)
            await one_chat(db, org)
        finally:
            org_fake.api_key = key
        assert len(platform_fake.requests_to("/v1/chat/completions")) == 1
        rows = await sql(
            db, "select key_source, outcome from public.usage_events where org_id = %s order by id", org["id"]
        )
        assert [(r["key_source"], r["outcome"]) for r in rows] == [("organization", "error"), ("platform", "ok")]
        actions = await sql(
            db,
            "select action from public.audit_log where org_id = %s and action like 'model_key.%%' order by id",
            org["id"],
        )
        assert [a["action"] for a in actions] == ["model_key.set", "model_key.fallback_changed", "model_key.broken"]

    async def test_an_organization_key_works_when_the_platform_has_none(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        monkeypatch.delenv("OPENAI_API_KEY")
        get_settings.cache_clear()
        result = await one_chat(db, org)
        assert not result.offline
        assert len(org_fake.requests_to("/v1/chat/completions")) == 1


class TestAttackers:
    async def test_a_member_cannot_read_save_change_or_remove(
        self, client: httpx.AsyncClient, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        calls = len(org_fake.requests)
        params = {"org_id": str(org["id"])}
        assert (await put_key(client, org["member"], org, org_fake.api_key, org_fake.base_url)).status_code == 403
        assert len(org_fake.requests) == calls, "no live call on a member's behalf"
        assert (await client.get("/api/model-key", params=params, headers=_auth(org["member"]))).status_code == 403
        assert (
            await client.patch(
                "/api/model-key", json={**params, "on_key_failure": "platform"}, headers=_auth(org["member"])
            )
        ).status_code == 403
        assert (await client.delete("/api/model-key", params=params, headers=_auth(org["member"]))).status_code == 403

    async def test_another_tenants_admin_gets_404_everywhere(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], org_fake: FakeOpenAI
    ) -> None:
        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        outsider = org["other"]["owner"]
        params = {"org_id": str(org["id"])}
        assert (await put_key(client, outsider, org, org_fake.api_key, org_fake.base_url)).status_code == 404
        assert (await client.get("/api/model-key", params=params, headers=_auth(outsider))).status_code == 404
        assert (await client.delete("/api/model-key", params=params, headers=_auth(outsider))).status_code == 404
        [row] = await sql(db, "select status from public.model_keys where org_id = %s", org["id"])
        assert row["status"] == "active"

    async def test_no_session_or_an_anon_token_is_a_401(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        anon = access_token(org["owner"], role="anon")
        for headers in ({}, {"Authorization": f"Bearer {anon}"}):
            response = await client.get("/api/model-key", params={"org_id": str(org["id"])}, headers=headers)
            assert response.status_code == 401

    async def test_clients_cannot_read_the_sealed_key_or_write_settings(
        self, db: Connection, org: dict[str, Any]
    ) -> None:
        import psycopg

        from tests.factories import user_claims

        await db.execute("set local role authenticated")
        await db.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(user_claims(org["owner"])),))
        for statement in (
            "select * from secrets.model_key_credentials",
            "update public.model_keys set on_key_failure = 'platform'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with db.transaction():
                    await db.execute(statement)

    async def test_a_validation_error_never_echoes_the_key(
        self, client: httpx.AsyncClient, org: dict[str, Any]
    ) -> None:
        secret = "sk-" + uuid.uuid4().hex
        ISSUED.append(secret)
        response = await client.put(
            "/api/model-key",
            json={"org_id": str(org["id"]), "api_key": secret, "base_url": "ftp://x", "extra": 1},
            headers=_auth(org["owner"]),
        )
        assert response.status_code == 422
        assert secret not in response.text


class TestCredentialKeyRotation:
    async def test_a_stored_model_key_is_resealed_and_still_opens_under_the_new_credential_key(
        self,
        client: httpx.AsyncClient,
        db: Connection,
        org: dict[str, Any],
        org_fake: FakeOpenAI,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        import base64
        import hashlib

        from shared.connections.rotate import rotate_credentials
        from shared.crypto import parse_keys
        from shared.gateway import keys

        await put_key(client, org["owner"], org, org_fake.api_key, org_fake.base_url)
        old = get_settings().credential_keys.get_secret_value()
        new = "k9:" + base64.b64encode(hashlib.sha256(b"rotation test key").digest()).decode()
        report = await rotate_credentials(TransactionDatabase(db), keyring=parse_keys(f"{new},{old}"))
        assert report.remaining == 0
        [row] = await sql(db, "select key_id from secrets.model_key_credentials where org_id = %s", org["id"])
        assert row["key_id"] == "k9"
        monkeypatch.setenv("CREDENTIAL_KEYS", new)  # the old key is gone
        get_settings.cache_clear()
        keys.forget(org["id"])
        assert (await one_chat(db, org)).content
        assert org_fake.requests_to("/v1/chat/completions")[-1].headers["authorization"] == f"Bearer {org_fake.api_key}"
