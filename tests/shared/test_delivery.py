"""The delivery outbox worker, with real commits, the real pool and racing workers.

Fresh tenants per test (deleted afterwards, cascading to their outbox), loopback fakes of every
provider, and the worker exactly as the cron runs it. Crashes are real: the worker task is
cancelled while the provider holds its answer, and only the lease brings the row back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from standardwebhooks import Webhook

from functions.cron_deliveries import app as cron_app
from shared.connections.delivery import _DELIVERED, RunReport, Worker, WorkerSettings, backoff_seconds, claim
from shared.connections.providers import get_provider_environment
from shared.connections.schemas import Credential, WebhookCreate
from shared.connections.service import create_connection, seal_credential
from shared.db.session import get_database
from shared.settings import get_settings
from tests.factories import create_org, user_claims
from tests.fakes.providers import Answer, Fakes, Request, running_fakes

Connection = AsyncConnection[DictRow]


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    with running_fakes() as running:
        yield running


@pytest.fixture(autouse=True)
def _reset_and_check_logs(fakes: Fakes, log_lines: list[str]) -> Iterator[None]:
    fakes.reset()
    yield
    # Whatever happened (retries, broken connections, egress denials), no log line carries a credential.
    secrets = [
        *fakes.github.tokens,
        *fakes.notion.tokens,
        *(path.rsplit("/", 1)[1] for path in fakes.slack.hooks),
        *(token for token, _ in fakes.discord.hooks.values()),
        *SIGNING_SECRETS,
    ]
    for line in log_lines:
        for secret in secrets:
            assert secret not in line, "a log line contains a raw credential"


@pytest.fixture
async def admin(admin_url: str, committed_db: None) -> AsyncIterator[Connection]:
    """A superuser connection in autocommit, for setting up and inspecting committed rows."""
    conn = await AsyncConnection.connect(admin_url, row_factory=dict_row, autocommit=True, prepare_threshold=None)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def org(admin: Connection) -> AsyncIterator[dict[str, Any]]:
    org = await create_org(admin)
    yield org
    await admin.execute("reset role")
    await admin.execute("delete from public.organizations where id = %s", (org["id"],))


async def q(admin: Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    await admin.execute("reset role")
    cursor = await admin.execute(query, params)
    return [dict(r) for r in await cursor.fetchall()] if cursor.description else []


async def add_connection(
    admin: Connection,
    org: dict[str, Any],
    kind: str,
    credential: Credential,
    target: dict[str, Any],
    deliver_kinds: tuple[str, ...] = ("escalation", "draft", "lead"),
) -> uuid.UUID:
    """A connection as the API stores it after a successful verification."""
    connection_id = uuid.uuid4()
    sealed = seal_credential(credential, org_id=org["id"], connection_id=connection_id)
    await q(
        admin,
        "insert into public.connections (id, org_id, kind, name, target, status, last_verified_at, deliver_kinds)"
        " values (%s, %s, %s, %s, %s, 'active', now(), %s)",
        connection_id,
        org["id"],
        kind,
        f"{kind} connection",
        Jsonb(target),
        list(deliver_kinds),
    )
    await q(
        admin,
        "insert into secrets.connection_credentials (connection_id, org_id, key_id, nonce, ciphertext)"
        " values (%s, %s, %s, %s, %s)",
        connection_id,
        org["id"],
        sealed.key_id,
        sealed.nonce,
        sealed.ciphertext,
    )
    return connection_id


async def add_item(
    admin: Connection, org: dict[str, Any], *, kind: str = "escalation", title: str = "Visitor asks for a refund"
) -> uuid.UUID:
    """A review item, as the server creates it; the database enqueues its deliveries."""
    rows = await q(
        admin,
        "insert into public.review_items (org_id, kind, title, payload) values (%s, %s, %s, %s) returning id",
        org["id"],
        kind,
        title,
        Jsonb({"visitor_email": "ada@example.com", "summary": "Wants a refund for order 1042 <!channel> @everyone"}),
    )
    item_id: uuid.UUID = rows[0]["id"]
    return item_id


async def deliveries(admin: Connection, org: dict[str, Any]) -> list[dict[str, Any]]:
    return await q(
        admin,
        "select *, next_attempt_at - now() as wait from public.deliveries where org_id = %s order by created_at",
        org["id"],
    )


async def run(fakes: Fakes, **settings: Any) -> RunReport:
    # The cron as a sweeper with no grace: every due row is its to take (no queue in these tests).
    options: dict[str, Any] = {"time_budget_seconds": 10.0, "stale_after_seconds": 0.0, **settings}
    return await Worker(get_database(), env=fakes.env, settings=WorkerSettings(**options)).run()


SIGNING_SECRETS: list[str] = []


def signing_secret() -> str:
    SIGNING_SECRETS.append("whsec_" + base64.b64encode(os.urandom(32)).decode())
    return SIGNING_SECRETS[-1]


async def webhook_connection(
    admin: Connection, org: dict[str, Any], fakes: Fakes, status: int = 200
) -> tuple[uuid.UUID, str]:
    secret = signing_secret()
    url = fakes.webhook.endpoint(status=status)
    return await add_connection(
        admin, org, "webhook", Credential(url=url, secret=secret), {"host": "127.0.0.1"}
    ), secret


async def github_connection(
    admin: Connection, org: dict[str, Any], fakes: Fakes, **token: Any
) -> tuple[uuid.UUID, str, str]:
    repo = fakes.github.add_repo(f"acme/support-{uuid.uuid4().hex[:6]}")
    value = fakes.github.token(repos={repo}, **token)
    target = {"repository": repo, "account": fakes.github.tokens[value].login, "private": True}
    return await add_connection(admin, org, "github", Credential(token=value), target), value, repo


async def notion_connection(
    admin: Connection, org: dict[str, Any], fakes: Fakes, parent_type: str, **token: Any
) -> tuple[uuid.UUID, str]:
    parent = fakes.notion.add_database("Task") if parent_type == "database" else fakes.notion.add_page()
    value = fakes.notion.token(shared={parent}, **token)
    target = {"parent_type": parent_type, "parent_id": parent}
    if parent_type == "database":
        target["title_property"] = "Task"
    return await add_connection(admin, org, "notion", Credential(token=value), target), parent


class TestEachKindIsDeliveredOnce:
    async def test_slack_message_escapes_visitor_text(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {"host": "127.0.0.1"})
        await add_item(admin, org)
        report = await run(fakes)
        assert report.delivered == 1
        [message] = fakes.slack.messages
        assert "Visitor asks for a refund" in message["text"]
        assert "<!channel>" not in message["text"]
        assert "&lt;!channel&gt;" in message["text"]
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 1
        assert delivery["delivered_at"] is not None

    async def test_discord_message_pings_nobody_and_records_the_message_id(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(
            admin, org, "discord_webhook", Credential(url=fakes.discord.webhook()), {"host": "127.0.0.1"}
        )
        await add_item(admin, org)
        await run(fakes)
        [message] = fakes.discord.messages
        assert message["allowed_mentions"] == {"parse": []}
        [delivery] = await deliveries(admin, org)
        assert delivery["external_ref"] == message["id"]

    async def test_github_issue_carries_the_idempotency_marker(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        _, _, repo = await github_connection(admin, org, fakes)
        await add_item(admin, org)
        await run(fakes)
        [issue] = fakes.github.issues[repo]
        assert issue["title"] == "[Escalation] Visitor asks for a refund"
        [delivery] = await deliveries(admin, org)
        assert f"hiredhands-delivery:{delivery['idempotency_key']}" in issue["body"]
        assert "```text" in issue["body"]  # visitor text fenced: its @mentions ping no one
        assert delivery["external_ref"] == issue["html_url"]

    @pytest.mark.parametrize("parent_type", ["database", "page"])
    async def test_notion_page_is_created_under_the_parent(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes, parent_type: str
    ) -> None:
        _, parent = await notion_connection(admin, org, fakes, parent_type)
        await add_item(admin, org, kind="lead", title="Ada wants a demo")
        await run(fakes)
        [page] = fakes.notion.created
        assert page["parent_id"] == parent
        title_property = "Task" if parent_type == "database" else "title"
        assert page["properties"][title_property]["title"][0]["text"]["content"].startswith(
            "Lead: Ada wants a demo (HH-"
        )
        [delivery] = await deliveries(admin, org)
        assert delivery["external_ref"].startswith("https://www.notion.so/")

    async def test_webhook_is_signed_per_standard_webhooks_with_a_stable_id(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        _, secret = await webhook_connection(admin, org, fakes)
        item_id = await add_item(admin, org)
        fakes.webhook.scripted.append(Answer(503))  # first attempt fails, the retry succeeds
        await run(fakes)
        await q(admin, "update public.deliveries set next_attempt_at = now() where org_id = %s", org["id"])
        await run(fakes)
        first, second = fakes.webhook.received("POST")
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        event = Webhook(secret).verify(second.body, second.headers)
        assert event["type"] == "review_item.created"
        assert event["data"]["id"] == str(item_id)
        [delivery] = await deliveries(admin, org)
        assert second.headers["webhook-id"] == "msg_" + delivery["idempotency_key"].hex
        assert delivery["status"] == "delivered"

    async def test_only_the_kinds_a_connection_asked_for_are_enqueued(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        url = fakes.slack.webhook()
        await add_connection(admin, org, "slack_webhook", Credential(url=url), {}, deliver_kinds=("lead",))
        await add_item(admin, org, kind="escalation")
        await add_item(admin, org, kind="lead")
        await run(fakes)
        assert len(fakes.slack.messages) == 1
        assert fakes.slack.messages[0]["text"].startswith("*Lead:*")


class TestTransientFailures:
    async def test_503_is_retried_later_with_the_error_recorded(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)
        fakes.slack.scripted.append(Answer(503, b"rollup_error"))
        report = await run(fakes)
        assert report.retried == 1
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "failed"
        assert delivery["attempts"] == 1
        assert "HTTP 503" in delivery["last_error"]
        assert delivery["wait"].total_seconds() > 10, "backoff schedules the retry later"
        assert (await run(fakes)).claimed == 0, "not due yet"

        await q(admin, "update public.deliveries set next_attempt_at = now() where org_id = %s", org["id"])
        await run(fakes)
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2
        assert delivery["last_error"] is None
        assert len(fakes.slack.messages) == 1

    async def test_retry_after_is_respected(self, admin: Connection, org: dict[str, Any], fakes: Fakes) -> None:
        await add_connection(admin, org, "discord_webhook", Credential(url=fakes.discord.webhook()), {})
        await add_item(admin, org)
        fakes.discord.scripted.append(Answer(429, b'{"retry_after": 600}', {"content-type": "application/json"}))
        await run(fakes)
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "failed"
        assert delivery["wait"].total_seconds() > 590

    async def test_unreachable_provider_is_retried_then_given_up(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        _, _ = await webhook_connection(admin, org, fakes, status=500)
        await add_item(admin, org)
        await run(fakes, max_attempts=2)
        await q(admin, "update public.deliveries set next_attempt_at = now() where org_id = %s", org["id"])
        report = await run(fakes, max_attempts=2)
        assert report.dead == 1
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "dead"
        assert delivery["last_error"].startswith("Gave up after 2 attempts")

    def test_backoff_grows_is_capped_and_honours_retry_after(self) -> None:
        settings = WorkerSettings(base_backoff_seconds=30, max_backoff_seconds=3600)
        key = uuid.uuid4()
        delays = [backoff_seconds(n, key, settings, None) for n in range(1, 12)]
        assert delays == sorted(delays)
        assert 15 <= delays[0] <= 30
        assert delays[-1] <= 3600
        assert backoff_seconds(1, key, settings, 900) >= 900
        assert backoff_seconds(1, key, settings, 10**9) <= 3600


class TestBrokenConnections:
    async def _assert_broken(
        self, admin: Connection, org: dict[str, Any], connection_id: uuid.UUID, fragment: str
    ) -> None:
        [connection] = await q(admin, "select * from public.connections where id = %s", connection_id)
        assert connection["status"] == "broken"
        assert fragment in connection["status_reason"]
        assert connection["broken_at"] is not None
        [audit] = await q(admin, "select * from public.audit_log where target_id = %s", str(connection_id))
        assert audit["action"] == "connection.broken"
        assert audit["actor"] == "delivery-worker"
        assert fragment in audit["details"]["reason"]

    async def test_revoked_token_breaks_the_connection_and_parks_its_deliveries(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, token, repo = await github_connection(admin, org, fakes)
        fakes.github.tokens[token].revoked = True
        await add_item(admin, org, title="first")
        report = await run(fakes)
        assert report.broken_connections == 1
        await self._assert_broken(admin, org, connection_id, "HTTP 401")
        [first] = await deliveries(admin, org)
        assert first["status"] == "failed"
        assert "HTTP 401" in first["last_error"]

        # While broken: nothing more is sent, nothing more is enqueued.
        await add_item(admin, org, title="second")
        assert (await run(fakes)).claimed == 0
        assert len(await deliveries(admin, org)) == 1

        # Fixed and re-verified: the parked delivery goes out.
        fakes.github.tokens[token].revoked = False
        await q(
            admin, "update public.connections set status = 'active', status_reason = null where id = %s", connection_id
        )
        await run(fakes)
        assert [i["title"] for i in fakes.github.issues[repo]] == ["[Escalation] first"]
        assert (await deliveries(admin, org))[0]["status"] == "delivered"

    async def test_token_without_issue_permission_breaks_on_403(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, _, _ = await github_connection(admin, org, fakes, can_write_issues=False)
        await add_item(admin, org)
        await run(fakes)
        await self._assert_broken(admin, org, connection_id, "HTTP 403")

    async def test_notion_parent_no_longer_shared_breaks_on_404(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, parent = await notion_connection(admin, org, fakes, "database")
        for token in fakes.notion.tokens.values():
            token.shared.discard(parent)
        await add_item(admin, org)
        await run(fakes)
        await self._assert_broken(admin, org, connection_id, "object_not_found")

    async def test_slack_webhook_revoked_breaks(self, admin: Connection, org: dict[str, Any], fakes: Fakes) -> None:
        url = fakes.slack.webhook()
        connection_id = await add_connection(admin, org, "slack_webhook", Credential(url=url), {})
        fakes.slack.hooks[httpx.URL(url).path] = "revoked"
        await add_item(admin, org)
        await run(fakes)
        await self._assert_broken(admin, org, connection_id, "invalid_token")

    async def test_a_refused_message_is_dead_but_the_connection_stays_active(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        connection_id, _, _ = await github_connection(admin, org, fakes)
        fakes.github.scripted.append(Answer(422, b'{"message":"Validation Failed"}'))
        await add_item(admin, org)
        report = await run(fakes)
        assert report.dead == 1
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "dead"
        assert "HTTP 422" in delivery["last_error"]
        [connection] = await q(admin, "select status from public.connections where id = %s", connection_id)
        assert connection["status"] == "active"


class TestEgressOnEverySend:
    async def test_url_public_at_save_and_private_at_send_is_denied_before_any_connection(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        host = f"hooks-{uuid.uuid4().hex[:6]}.customer.example"
        url = f"http://{host}:{fakes.webhook.port}/hooks/rebind"
        fakes.webhook.statuses["/hooks/rebind"] = 200
        # At save time the name resolves to the (allowed) receiver: verified and stored by the API path.
        fakes.resolver.answers[host] = ["127.0.0.1"]
        body = WebhookCreate.model_validate(
            {"org_id": org["id"], "kind": "webhook", "name": "CRM", "url": url, "signing_secret": signing_secret()}
        )
        created = await create_connection(
            get_database(), user_claims(org["owner"]), body, env=fakes.env, request_id=None
        )
        assert created.status == "active"
        assert len(fakes.webhook.received("POST")) == 1  # the signed ping

        # At send time the same name answers a private address, where something is listening.
        listener = socket.socket()
        listener.bind(("127.0.0.2", fakes.webhook.port))
        listener.listen(8)
        listener.setblocking(False)
        try:
            fakes.resolver.answers[host] = ["127.0.0.2"]
            await add_item(admin, org)
            await run(fakes)
            with pytest.raises(BlockingIOError):
                listener.accept()  # no connection ever reached the private address
        finally:
            listener.close()
        assert len(fakes.webhook.received("POST")) == 1, "nothing was sent"
        [connection] = await q(admin, "select * from public.connections where id = %s", created.id)
        assert connection["status"] == "broken"
        assert "private" in connection["status_reason"]
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "failed"


def _holds(method: str, path_part: str) -> Any:
    def match(request: Request) -> bool:
        return request.method == method and path_part in request.path

    return match


async def _crash_mid_send(fakes: Fakes, server: Any) -> None:
    """Run a worker until the provider has received (and acted on) the request, then kill it."""
    task = asyncio.create_task(run(fakes, lease_seconds=300))
    assert await asyncio.to_thread(server.held.wait, 10), "the request never reached the provider"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    server.release.set()


class TestCrashSafety:
    async def test_worker_dying_after_github_created_the_issue_never_creates_a_second(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        _, _, repo = await github_connection(admin, org, fakes)
        await add_item(admin, org)
        fakes.github.hold_when = _holds("POST", "/issues")
        await _crash_mid_send(fakes, fakes.github)

        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "in_progress", "the row is not lost"
        assert delivery["attempts"] == 1
        assert len(fakes.github.issues[repo]) == 1, "GitHub created the issue before the worker died"
        assert (await run(fakes)).claimed == 0, "the lease still protects the row"

        await q(
            admin,
            "update public.deliveries set lease_expires_at = now() - interval '1 second' where org_id = %s",
            org["id"],
        )
        report = await run(fakes)
        assert report.found_existing == 1
        assert len(fakes.github.issues[repo]) == 1, "not sent twice"
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2
        assert delivery["external_ref"] == fakes.github.issues[repo][0]["html_url"]

    @pytest.mark.parametrize("parent_type", ["database", "page"])
    async def test_worker_dying_after_notion_created_the_page_never_creates_a_second(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes, parent_type: str
    ) -> None:
        await notion_connection(admin, org, fakes, parent_type)
        await add_item(admin, org)
        fakes.notion.hold_when = _holds("POST", "/v1/pages")
        await _crash_mid_send(fakes, fakes.notion)
        assert len(fakes.notion.created) == 1

        await q(
            admin,
            "update public.deliveries set lease_expires_at = now() - interval '1 second' where org_id = %s",
            org["id"],
        )
        report = await run(fakes)
        assert report.found_existing == 1
        assert len(fakes.notion.created) == 1, "not sent twice"
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "delivered"
        assert delivery["external_ref"].endswith(fakes.notion.created[0]["id"].replace("-", ""))

    async def test_worker_dying_before_the_send_leaves_the_row_to_be_retried_once(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)
        claimed = await claim(get_database(), limit=10, lease_seconds=300)  # ... and then the worker died
        assert [job.attempts for job in claimed] == [1]
        assert (await run(fakes)).claimed == 0

        await q(
            admin,
            "update public.deliveries set lease_expires_at = now() - interval '1 second' where org_id = %s",
            org["id"],
        )
        await run(fakes)
        assert len(fakes.slack.messages) == 1
        [delivery] = await deliveries(admin, org)
        assert delivery["status"] == "delivered"
        assert delivery["attempts"] == 2

    async def test_a_worker_that_outlived_its_lease_cannot_overwrite_the_new_claim(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)
        [stale] = await claim(get_database(), limit=10, lease_seconds=300)
        await q(
            admin,
            "update public.deliveries set lease_expires_at = now() - interval '1 second' where org_id = %s",
            org["id"],
        )
        await run(fakes)
        worker = Worker(get_database(), env=fakes.env)
        assert await worker._finish(_DELIVERED, stale, external_ref="stale") is False
        [delivery] = await deliveries(admin, org)
        assert delivery["attempts"] == 2
        assert delivery["external_ref"] is None


class TestWorkersCooperate:
    async def test_four_racing_workers_deliver_each_row_exactly_once(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        _, secret = await webhook_connection(admin, org, fakes)
        for n in range(40):
            await add_item(admin, org, title=f"item {n}")
        reports = await asyncio.gather(*(run(fakes, batch_size=3, concurrency=3) for _ in range(4)))
        assert sum(r.delivered for r in reports) == 40
        assert sum(r.claimed for r in reports) == 40, "no row claimed twice"
        posts = fakes.webhook.received("POST")
        ids = [p.headers["webhook-id"] for p in posts]
        assert len(ids) == 40
        assert len(set(ids)) == 40
        for post in posts:
            Webhook(secret).verify(post.body, post.headers)
        rows = await deliveries(admin, org)
        assert {(r["status"], r["attempts"]) for r in rows} == {("delivered", 1)}


class TestCronEndpoint:
    @pytest.fixture
    async def cron(self, fakes: Fakes, committed_db: None) -> AsyncIterator[httpx.AsyncClient]:
        cron_app.dependency_overrides[get_provider_environment] = lambda: fakes.env
        transport = httpx.ASGITransport(app=cron_app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client
        cron_app.dependency_overrides.clear()

    @pytest.fixture
    def cron_secret(self) -> Iterator[str]:
        secret = "cron-" + uuid.uuid4().hex
        os.environ["CRON_SECRET"] = secret
        get_settings.cache_clear()
        yield secret
        os.environ.pop("CRON_SECRET", None)
        get_settings.cache_clear()

    async def test_refuses_callers_without_the_cron_secret(self, cron: httpx.AsyncClient, cron_secret: str) -> None:
        assert (await cron.get("/api/cron/deliveries")).status_code == 401
        wrong = await cron.get("/api/cron/deliveries", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert cron_secret not in wrong.text

    async def test_refuses_everyone_when_no_secret_is_configured(self, cron: httpx.AsyncClient) -> None:
        response = await cron.get("/api/cron/deliveries", headers={"Authorization": "Bearer "})
        assert response.status_code == 401

    async def test_runs_the_worker_for_the_scheduler(
        self, cron: httpx.AsyncClient, cron_secret: str, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)
        fresh = await cron.get("/api/cron/deliveries", headers={"Authorization": f"Bearer {cron_secret}"})
        assert fresh.json()["claimed"] == 0, "a delivery due just now belongs to its queue message"
        # Its message was lost: once it has been due for longer than the sweeper's grace, the cron sends it.
        await q(
            admin,
            "update public.deliveries set next_attempt_at = now() - interval '31 seconds' where org_id = %s",
            org["id"],
        )
        response = await cron.get("/api/cron/deliveries", headers={"Authorization": f"Bearer {cron_secret}"})
        assert response.status_code == 200
        assert response.json()["delivered"] == 1
        assert len(fakes.slack.messages) == 1
