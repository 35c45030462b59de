"""POST /api/connections, POST /api/connections/{id}/verify, DELETE /api/connections/{id}.

Against the real database (one rolled-back transaction per test) and loopback fakes of every
provider (tests/fakes/providers.py), reached through the egress guard. After every test, every
HTTP response body our API produced and every log line written are searched for every raw secret the
fakes issued: none may appear.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from standardwebhooks import Webhook

from functions.connection_verify import app
from shared.connections.errors import CredentialRejected
from shared.connections.providers import PRODUCTION, get_provider_environment, verify
from shared.connections.schemas import Credential
from shared.connections.service import OUTBOUND_CHECKS
from shared.crypto import get_keyring
from shared.egress import EgressPolicy
from shared.ratelimit import check
from shared.redis import get_redis
from shared.web.deps import get_request_database
from tests.card_data import snowflakes
from tests.conftest import TransactionDatabase
from tests.factories import access_token, add_member, closed_port, create_org, user_claims
from tests.fakes.providers import Answer, Fakes, running_fakes

Connection = AsyncConnection[DictRow]

# Every raw secret handed to the code under test in this module; none may ever come back out.
ISSUED: list[str] = []


def issued(value: str) -> str:
    ISSUED.append(value)
    # The secret part of a webhook URL (its last path segment) is checked on its own too.
    if value.startswith("http") and len(value.rsplit("/", 1)[1]) >= 16:
        ISSUED.append(value.rsplit("/", 1)[1])
    return value


def signing_secret() -> str:
    return issued("whsec_" + base64.b64encode(os.urandom(32)).decode())


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    with running_fakes() as running:
        yield running


@pytest.fixture(autouse=True)
def _reset(fakes: Fakes) -> None:
    fakes.reset()


class Api:
    def __init__(self, client: httpx.AsyncClient, bodies: list[str]) -> None:
        self.client = client
        self.bodies = bodies

    async def create(self, user: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
        return await self.client.post("/api/connections", json=body, headers=_auth(user))

    async def verify(self, user: dict[str, Any], connection_id: str) -> httpx.Response:
        return await self.client.post(f"/api/connections/{connection_id}/verify", headers=_auth(user))

    async def delete(self, user: dict[str, Any], connection_id: str) -> httpx.Response:
        return await self.client.delete(f"/api/connections/{connection_id}", headers=_auth(user))


def _auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token(user)}"}


@pytest.fixture
async def api(db: Connection, fakes: Fakes, log_lines: list[str]) -> AsyncIterator[Api]:
    bodies: list[str] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(response.text)

    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    app.dependency_overrides[get_provider_environment] = lambda: fakes.env
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", event_hooks={"response": [keep]}) as c:
        yield Api(c, bodies)
    app.dependency_overrides.clear()
    # The promise: no stored secret comes back in a response or reaches a log line.
    for secret in ISSUED:
        for body in bodies:
            assert secret not in body, "a response body contains a raw credential"
        for line in log_lines:
            assert secret not in line, "a log line contains a raw credential"


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    org = await create_org(db)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    other = await create_org(db)
    org["outsider"] = other["owner"]
    return org


async def sql(db: Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    await db.execute("reset role")
    cursor = await db.execute(query, params)
    return [dict(r) for r in await cursor.fetchall()] if cursor.description else []


def slack_body(org: dict[str, Any], url: str, **extra: Any) -> dict[str, Any]:
    return {"org_id": str(org["id"]), "kind": "slack_webhook", "name": "Support", "webhook_url": url, **extra}


def github_body(org: dict[str, Any], token: str, repository: str) -> dict[str, Any]:
    return {"org_id": str(org["id"]), "kind": "github", "name": "Issues", "token": token, "repository": repository}


def notion_body(org: dict[str, Any], token: str, parent_type: str, parent_id: str) -> dict[str, Any]:
    return {
        "org_id": str(org["id"]),
        "kind": "notion",
        "name": "Notes",
        "token": token,
        "parent": {"type": parent_type, "id": parent_id},
    }


def webhook_body(org: dict[str, Any], url: str, secret: str) -> dict[str, Any]:
    return {"org_id": str(org["id"]), "kind": "webhook", "name": "CRM", "url": url, "signing_secret": secret}


def assert_refused(response: httpx.Response, *fragments: str, slug: str = "connection-verification-failed") -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("/" + slug), problem
    for fragment in fragments:
        assert fragment in problem["detail"], problem["detail"]


async def connections_of(db: Connection, org: dict[str, Any]) -> list[dict[str, Any]]:
    return await sql(db, "select * from public.connections where org_id = %s", org["id"])


class TestCreateSlack:
    async def test_valid_webhook_is_verified_without_posting_and_stored_encrypted(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.slack.webhook())
        response = await api.create(org["owner"], slack_body(org, url, deliver_kinds=["escalation", "lead"]))
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["kind"] == "slack_webhook"
        assert body["status"] == "active"
        assert body["secret_hint"] == "…" + url[-4:]
        assert body["deliver_kinds"] == ["escalation", "lead"]
        assert body["target"] == {"host": "127.0.0.1"}
        assert body["last_verified_at"] is not None
        # The check posted an empty message, which a live webhook refuses: nothing reached the channel.
        posts = fakes.slack.received("POST")
        assert len(posts) == 1
        assert posts[0].json() == {}
        assert fakes.slack.messages == []

        [row] = await sql(db, "select * from secrets.connection_credentials where connection_id = %s", body["id"])
        assert row["key_id"] == get_keyring().current_key_id
        assert url.encode() not in bytes(row["ciphertext"])
        assert url not in json.dumps(await connections_of(db, org), default=str)
        [audit] = await sql(db, "select * from public.audit_log where target_id = %s", body["id"])
        assert audit["action"] == "connection.created"
        assert audit["actor_user_id"] == org["owner"]["id"]
        assert audit["request_id"] == response.headers["x-request-id"]

    async def test_revoked_webhook_is_refused_with_slacks_answer_and_nothing_stored(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.slack.webhook(state="revoked"))
        assert_refused(await api.create(org["owner"], slack_body(org, url)), "HTTP 403 invalid_token", "revoked")
        assert await connections_of(db, org) == []
        assert await sql(db, "select 1 from secrets.connection_credentials where org_id = %s", org["id"]) == []

    async def test_removed_webhook_is_refused(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.slack.url + "/services/T0GONE1/B0GONE1/" + uuid.uuid4().hex)
        assert_refused(await api.create(org["admin"], slack_body(org, url)), "HTTP 404 no_service")
        assert await connections_of(db, org) == []

    async def test_archived_channel_is_refused(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        url = issued(fakes.slack.webhook(state="archived"))
        assert_refused(await api.create(org["owner"], slack_body(org, url)), "HTTP 410 channel_is_archived")

    async def test_url_on_another_host_is_refused_before_any_request(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued("http://hooks.evil.example/services/T0AAAAA/B0AAAAA/" + uuid.uuid4().hex)
        assert_refused(await api.create(org["owner"], slack_body(org, url)), "must be on 127.0.0.1")
        assert fakes.resolver.calls == []

    async def test_provider_outage_is_a_422_and_nothing_is_stored(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.slack.webhook())
        fakes.slack.scripted.append(Answer(503, b"rollup_error"))
        assert_refused(await api.create(org["owner"], slack_body(org, url)), "temporary problem (HTTP 503)")
        assert await connections_of(db, org) == []

    async def test_unreachable_endpoint_is_refused(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        port = closed_port()  # nothing listens there
        policy = fakes.env.policy
        env = dataclasses.replace(
            fakes.env,
            policy=EgressPolicy(
                purpose=policy.purpose,
                allowed_ports=policy.allowed_ports | {port},
                allow_addresses=policy.allow_addresses | {f"127.0.0.1:{port}"},
                connect_timeout=1.0,
                read_timeout=1.0,
            ),
        )
        app.dependency_overrides[get_provider_environment] = lambda: env
        url = issued(f"http://127.0.0.1:{port}/services/T0DOWN1/B0DOWN1/{uuid.uuid4().hex}")
        assert_refused(await api.create(org["owner"], slack_body(org, url)), "Slack could not be reached")
        assert await connections_of(db, org) == []


class TestCreateDiscord:
    async def test_valid_webhook_is_read_with_get_and_its_token_dropped(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.discord.webhook())
        body = {"org_id": str(org["id"]), "kind": "discord_webhook", "name": "Alerts", "webhook_url": url}
        response = await api.create(org["owner"], body)
        assert response.status_code == 201, response.text
        target = response.json()["target"]
        assert target["webhook_name"] == "Support alerts"
        assert target["channel_id"] == "1100000000000000001"
        assert [r.method for r in fakes.discord.requests] == ["GET"]
        assert fakes.discord.messages == []

    @pytest.mark.parametrize(("state", "expected"), [("reset", "HTTP 401"), ("deleted", "HTTP 404 Unknown Webhook")])
    async def test_reset_or_deleted_webhook_is_refused(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes, state: str, expected: str
    ) -> None:
        url = issued(fakes.discord.webhook(state=state))
        body = {"org_id": str(org["id"]), "kind": "discord_webhook", "name": "Alerts", "webhook_url": url}
        assert_refused(await api.create(org["owner"], body), expected)
        assert await connections_of(db, org) == []


class TestNumericIdsAreNotCards:
    """Discord webhook ids are 17-19-digit numbers and one in ten passes Luhn; they are ids, not cards."""

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(snowflake=snowflakes())
    async def test_discord_webhooks_with_luhn_valid_ids_are_created(
        self, api: Api, db: Connection, fakes: Fakes, snowflake: str
    ) -> None:
        org = await create_org(db)  # one per example: each organization's checks are rate limited
        url = issued(fakes.discord.webhook(hook_id=snowflake))
        body = {"org_id": str(org["id"]), "kind": "discord_webhook", "name": f"Alerts {uuid.uuid4().hex[:8]}"}
        response = await api.create(org["owner"], {**body, "webhook_url": url})
        assert response.status_code == 201, response.text

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(snowflake=snowflakes())
    async def test_the_same_number_typed_into_the_name_is_refused_and_nothing_is_stored(
        self, api: Api, db: Connection, fakes: Fakes, snowflake: str
    ) -> None:
        org = await create_org(db)
        url = issued(fakes.discord.webhook(hook_id=snowflake))
        body = {"org_id": str(org["id"]), "kind": "discord_webhook", "name": f"card {snowflake}", "webhook_url": url}
        response = await api.create(org["owner"], body)
        assert_refused(response, slug="card-data-refused")
        assert snowflake not in response.text
        assert await connections_of(db, org) == []


class TestCreateGitHub:
    async def test_valid_token_reaching_the_repository_is_stored(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        repo = fakes.github.add_repo(f"acme/support-{uuid.uuid4().hex[:6]}")
        token = issued(fakes.github.token(repos={repo}))
        response = await api.create(org["owner"], github_body(org, token, repo))
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["target"]["repository"] == repo
        assert body["target"]["account"] == fakes.github.tokens[token].login
        assert body["secret_hint"] == "…" + token[-4:]
        # Verification read, and created nothing.
        assert {r.method for r in fakes.github.requests} == {"GET"}
        assert fakes.github.issues[repo] == []

    async def test_fine_grained_token_without_scope_header_is_accepted(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        repo = fakes.github.add_repo(f"acme/fg-{uuid.uuid4().hex[:6]}")
        token = issued(fakes.github.token(repos={repo}, scopes=None))
        assert (await api.create(org["owner"], github_body(org, token, repo))).status_code == 201

    async def test_revoked_token_is_refused(self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes) -> None:
        repo = fakes.github.add_repo(f"acme/rev-{uuid.uuid4().hex[:6]}")
        token = issued(fakes.github.token(repos={repo}))
        fakes.github.tokens[token].revoked = True
        assert_refused(await api.create(org["owner"], github_body(org, token, repo)), "HTTP 401", "revoked")
        assert await connections_of(db, org) == []

    async def test_classic_token_without_repo_scope_is_refused(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        repo = fakes.github.add_repo(f"acme/scope-{uuid.uuid4().hex[:6]}", private=True)
        token = issued(fakes.github.token(repos={repo}, scopes="read:user, public_repo"))
        assert_refused(await api.create(org["owner"], github_body(org, token, repo)), "lacks the repo scope")

    async def test_public_repo_scope_is_enough_for_a_public_repository(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        repo = fakes.github.add_repo(f"acme/pub-{uuid.uuid4().hex[:6]}", private=False)
        token = issued(fakes.github.token(repos={repo}, scopes="public_repo"))
        assert (await api.create(org["owner"], github_body(org, token, repo))).status_code == 201

    async def test_repository_the_token_cannot_see_is_refused(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        repo = fakes.github.add_repo(f"acme/hidden-{uuid.uuid4().hex[:6]}")
        token = issued(fakes.github.token(repos=set()))
        assert_refused(await api.create(org["owner"], github_body(org, token, repo)), f"cannot see {repo}", "HTTP 404")

    @pytest.mark.parametrize(
        ("flags", "expected"), [({"has_issues": False}, "Issues are disabled"), ({"archived": True}, "archived")]
    )
    async def test_repository_that_takes_no_issues_is_refused(
        self, api: Api, org: dict[str, Any], fakes: Fakes, flags: dict[str, bool], expected: str
    ) -> None:
        repo = fakes.github.add_repo(f"acme/closed-{uuid.uuid4().hex[:6]}", **flags)
        token = issued(fakes.github.token(repos={repo}))
        assert_refused(await api.create(org["owner"], github_body(org, token, repo)), expected)

    async def test_malformed_repository_is_a_validation_error(self, api: Api, org: dict[str, Any]) -> None:
        token = issued("ghp_" + uuid.uuid4().hex)
        response = await api.create(org["owner"], github_body(org, token, "acme/../etc"))
        assert response.status_code == 422
        assert response.json()["type"].endswith("/validation-error")


class TestCreateNotion:
    async def test_database_parent_remembers_its_title_property(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        database = fakes.notion.add_database(title_property="Ticket")
        token = issued(fakes.notion.token(shared={database}))
        response = await api.create(org["owner"], notion_body(org, token, "database", database))
        assert response.status_code == 201, response.text
        target = response.json()["target"]
        assert target["title_property"] == "Ticket"
        assert target["parent_id"] == database
        assert fakes.notion.created == []
        assert all(r.headers.get("notion-version") for r in fakes.notion.requests)

    async def test_page_parent_is_accepted(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        page = fakes.notion.add_page()
        token = issued(fakes.notion.token(shared={page}))
        assert (await api.create(org["owner"], notion_body(org, token, "page", page))).status_code == 201

    async def test_revoked_token_is_refused(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        page = fakes.notion.add_page()
        token = issued(fakes.notion.token(shared={page}))
        fakes.notion.tokens[token].revoked = True
        assert_refused(await api.create(org["owner"], notion_body(org, token, "page", page)), "HTTP 401 unauthorized")

    async def test_parent_not_shared_with_the_integration_is_refused(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        page = fakes.notion.add_page()
        token = issued(fakes.notion.token(shared=set()))
        assert_refused(
            await api.create(org["owner"], notion_body(org, token, "page", page)),
            "HTTP 404 object_not_found",
            "share it with the integration",
        )

    async def test_integration_without_read_capability_is_refused(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        database = fakes.notion.add_database()
        token = issued(fakes.notion.token(shared={database}, can_read=False))
        assert_refused(
            await api.create(org["owner"], notion_body(org, token, "database", database)),
            "HTTP 403 restricted_resource",
        )


class TestCreateWebhook:
    async def test_valid_endpoint_gets_a_signed_ping_verifiable_with_the_standard_library(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        secret = signing_secret()
        url = issued(fakes.webhook.endpoint())
        response = await api.create(org["owner"], webhook_body(org, url, secret))
        assert response.status_code == 201, response.text
        assert response.json()["secret_hint"] == "…" + secret[-4:]
        [ping] = fakes.webhook.received("POST")
        event = Webhook(secret).verify(ping.body, ping.headers)
        assert event["type"] == "ping"
        with pytest.raises(Exception, match="signature"):
            Webhook(signing_secret()).verify(ping.body, ping.headers)

    async def test_endpoint_answering_410_is_refused(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        url = issued(fakes.webhook.endpoint(status=410))
        assert_refused(await api.create(org["owner"], webhook_body(org, url, signing_secret())), "HTTP 410")

    async def test_redirecting_endpoint_is_refused_and_not_followed(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.webhook.endpoint(status=301))
        assert_refused(await api.create(org["owner"], webhook_body(org, url, signing_secret())), "redirect")

    @pytest.mark.parametrize(
        "url",
        ["http://10.0.0.8/hook", "http://169.254.169.254/latest/meta-data", "http://127.0.0.1:6379/"],
    )
    async def test_internal_destination_is_refused_by_the_egress_guard(
        self, api: Api, db: Connection, org: dict[str, Any], url: str
    ) -> None:
        response = await api.create(org["owner"], webhook_body(org, url, signing_secret()))
        assert_refused(response, slug="egress-denied")
        assert await connections_of(db, org) == []

    async def test_signing_secret_that_is_not_base64_is_refused(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        secret = issued("whsec_" + "!" * 40)
        response = await api.create(org["owner"], webhook_body(org, fakes.webhook.endpoint(), secret))
        assert_refused(response, "signing secret")
        assert fakes.webhook.requests == []


class TestWhoMayCreate:
    async def test_member_who_is_not_an_admin_cannot_create(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.slack.webhook())
        response = await api.create(org["member"], slack_body(org, url))
        assert response.status_code == 403
        assert fakes.slack.requests == [], "no live call for a caller who may not create"
        assert await connections_of(db, org) == []

    async def test_another_organizations_member_gets_404(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        url = issued(fakes.slack.webhook())
        assert (await api.create(org["outsider"], slack_body(org, url))).status_code == 404
        assert fakes.slack.requests == []

    async def test_no_token_is_401(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        url = issued(fakes.slack.webhook())
        response = await api.client.post("/api/connections", json=slack_body(org, url))
        assert response.status_code == 401

    async def test_unknown_fields_are_refused_without_echoing_them(
        self, api: Api, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = issued(fakes.slack.webhook())
        response = await api.create(org["owner"], slack_body(org, url, token=url))
        assert response.status_code == 422


class TestOutboundCheckLimit:
    async def test_an_organization_over_its_check_limit_gets_a_429_and_no_request_is_made(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        for _ in range(OUTBOUND_CHECKS.limit):
            await check(get_redis(), OUTBOUND_CHECKS, str(org["id"]))
        url = issued(fakes.slack.webhook())

        response = await api.create(org["owner"], slack_body(org, url))

        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert fakes.slack.received("POST") == [], "no request left for the provider"
        assert await connections_of(db, org) == []


async def _create_github(api: Api, org: dict[str, Any], fakes: Fakes) -> tuple[str, str, str]:
    repo = fakes.github.add_repo(f"acme/verify-{uuid.uuid4().hex[:6]}")
    token = issued(fakes.github.token(repos={repo}))
    response = await api.create(org["owner"], github_body(org, token, repo))
    assert response.status_code == 201, response.text
    return response.json()["id"], token, repo


class TestReverify:
    async def test_valid_connection_stays_active_and_records_the_time(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        await sql(
            db, "update public.connections set last_verified_at = now() - interval '1 day' where id = %s", connection_id
        )
        response = await api.verify(org["admin"], connection_id)
        assert response.status_code == 200, response.text
        [row] = await sql(
            db,
            "select *, now() - last_verified_at < interval '1 minute' as fresh from public.connections where id = %s",
            connection_id,
        )
        assert row["status"] == "active"
        assert row["fresh"]
        actions = [
            a["action"]
            for a in await sql(
                db, "select action from public.audit_log where target_id = %s order by id", connection_id
            )
        ]
        assert actions == ["connection.created", "connection.verified"]

    async def test_revoked_credential_breaks_the_connection_then_a_fix_restores_it(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, token, _ = await _create_github(api, org, fakes)
        fakes.github.tokens[token].revoked = True
        broken = await api.verify(org["owner"], connection_id)
        assert broken.status_code == 200
        body = broken.json()
        assert body["status"] == "broken"
        assert "HTTP 401" in body["status_reason"]
        assert body["broken_at"] is not None

        fakes.github.tokens[token].revoked = False
        restored = (await api.verify(org["owner"], connection_id)).json()
        assert restored["status"] == "active"
        assert restored["broken_at"] is None
        assert restored["status_reason"] is None
        actions = [
            a["action"]
            for a in await sql(
                db, "select action from public.audit_log where target_id = %s order by id", connection_id
            )
        ]
        assert actions == ["connection.created", "connection.broken", "connection.verified"]

    async def test_provider_outage_is_503_and_changes_nothing(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        fakes.github.scripted.append(Answer(502, b"bad gateway"))
        response = await api.verify(org["owner"], connection_id)
        assert response.status_code == 503
        [row] = await sql(db, "select status from public.connections where id = %s", connection_id)
        assert row["status"] == "active"

    async def test_member_may_not_reverify(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        assert (await api.verify(org["member"], connection_id)).status_code == 403

    async def test_another_organization_gets_404(self, api: Api, org: dict[str, Any], fakes: Fakes) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        before = len(fakes.github.requests)
        assert (await api.verify(org["outsider"], connection_id)).status_code == 404
        assert (await api.verify(org["owner"], str(uuid.uuid4()))).status_code == 404
        assert len(fakes.github.requests) == before


class TestDelete:
    async def test_admin_deletes_and_the_credential_and_an_audit_row_follow(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        response = await api.delete(org["admin"], connection_id)
        assert response.status_code == 204
        assert await connections_of(db, org) == []
        assert (
            await sql(db, "select 1 from secrets.connection_credentials where connection_id = %s", connection_id) == []
        )
        [audit] = await sql(
            db, "select * from public.audit_log where target_id = %s and action = 'connection.deleted'", connection_id
        )
        assert audit["actor_user_id"] == org["admin"]["id"]
        assert audit["actor"] == "authenticated"
        assert audit["request_id"] == response.headers["x-request-id"]

    async def test_member_may_not_delete(self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        assert (await api.delete(org["member"], connection_id)).status_code == 403
        assert len(await connections_of(db, org)) == 1

    async def test_another_organization_gets_404(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, _, _ = await _create_github(api, org, fakes)
        assert (await api.delete(org["outsider"], connection_id)).status_code == 404
        assert len(await connections_of(db, org)) == 1


class TestSecretsTable:
    @pytest.mark.parametrize("role", ["authenticated", "anon"])
    async def test_direct_select_is_a_permission_error(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes, role: str
    ) -> None:
        await _create_github(api, org, fakes)
        await db.execute("reset role")
        claims = user_claims(org["owner"]) if role == "authenticated" else {}
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as raised:
            async with db.transaction():
                await db.execute(
                    "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                    (role, json.dumps({**claims, "role": role})),
                )
                await db.execute("select * from secrets.connection_credentials")
        assert raised.value.sqlstate == "42501"

    async def test_members_read_connection_metadata_but_never_a_secret(
        self, api: Api, db: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, token, _ = await _create_github(api, org, fakes)
        await db.execute("reset role")
        async with db.transaction(force_rollback=True):
            await db.execute(
                "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                (json.dumps(user_claims(org["member"])),),
            )
            rows = await (await db.execute("select * from public.connections")).fetchall()
        assert [str(r["id"]) for r in rows] == [connection_id]
        assert token not in json.dumps([dict(r) for r in rows], default=str)


class TestProductionEnvironment:
    """What production talks to is fixed in code: only tests build another environment."""

    def test_defaults_are_the_real_providers_over_https(self) -> None:
        env = get_provider_environment()
        assert env.github_api == "https://api.github.com"
        assert env.notion_api == "https://api.notion.com"
        assert env.slack_hosts == frozenset({"hooks.slack.com"})
        assert env.https_only
        assert env.policy.allowed_schemes == frozenset({"https"})
        assert env.policy.allow_addresses == frozenset()
        assert env.policy.max_redirects == 0

    @pytest.mark.parametrize(
        "url",
        [
            "http://hooks.slack.com/services/T0AAAAAA/B0AAAAAA/abcdefghijklmnopqrstuvwx",
            "https://hooks.slack.com.evil.example/services/T0AAAAAA/B0AAAAAA/abcdefghijklmnopqrstuvwx",
            "https://hooks.slack.com/workflows/T0AAAAAA/B0AAAAAA/abcdefghijklmnopqrstuvwx",
        ],
    )
    async def test_slack_urls_must_be_https_on_slacks_host_with_slacks_shape(self, url: str) -> None:
        async with PRODUCTION.client() as client:
            with pytest.raises(CredentialRejected):
                await verify("slack_webhook", Credential(url=url), {}, client=client, env=PRODUCTION)
