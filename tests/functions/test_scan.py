"""POST /api/scans, GET /api/scans/{id} and the worker cron GET /api/cron/scans, through the
functions' own apps, against the real database (one rolled-back transaction per test) and the
customer's site on loopback (tests/fakes/site.py), reached through the egress guard.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from functions.cron_scans import app as cron_app
from functions.scan import app
from shared.egress import CUSTOMER_MESSAGES, EgressReason
from shared.scans import ScanEnvironment, get_scan_environment
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import ROOT, Connection, TransactionDatabase
from tests.factories import access_token, add_member, create_agent, create_org
from tests.fakes.site import STORED_PATHS, FakeSite, running_acme_site

CRON_SECRET = "cron-secret-for-tests-0123456789"


@pytest.fixture(scope="module")
def site() -> Iterator[FakeSite]:
    with running_acme_site() as running:
        yield running


@pytest.fixture
def env(site: FakeSite) -> ScanEnvironment:
    site.reset()
    return ScanEnvironment(
        policy=site.policy(), resolver=site.resolver(), politeness_seconds=0, concurrency=1, stale_after_seconds=0
    )


async def _client(target: FastAPI, db: Connection, env: ScanEnvironment) -> AsyncIterator[httpx.AsyncClient]:
    target.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    target.dependency_overrides[get_scan_environment] = lambda: env
    transport = httpx.ASGITransport(app=target, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    target.dependency_overrides.clear()


@pytest.fixture
async def client(db: Connection, env: ScanEnvironment) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(app, db, env):
        yield c


@pytest.fixture
async def cron(
    db: Connection, env: ScanEnvironment, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("CRON_SECRET", CRON_SECRET)
    get_settings.cache_clear()
    async for c in _client(cron_app, db, env):
        yield c
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    org = await create_org(db)
    org["agent"] = await create_agent(db, org)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    org["outsider"] = (await create_org(db))["owner"]
    return org


def auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token(user)}"}


async def count(db: Connection, table: str, org_id: uuid.UUID) -> int:
    await db.execute("reset role")
    query = {
        "scans": "select count(*) as n from public.scans where org_id = %s",
        "sources": "select count(*) as n from public.knowledge_sources where org_id = %s",
    }[table]
    row = await (await db.execute(query, (org_id,))).fetchone()
    assert row is not None
    return int(row["n"])


class TestCreate:
    async def test_an_owner_queues_a_scan_and_gets_the_row(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], site: FakeSite
    ) -> None:
        response = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/#top")},
            headers=auth(org["owner"]),
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["status"] == "queued"
        assert body["start_url"] == site.url("/"), "stored normalised"
        assert body["page_limit"] == 50, "the plan's maximum when none is asked for"
        assert (body["pages_found"], body["pages_fetched"], body["skip_reasons"]) == (1, 0, {})
        assert body["source_id"] is not None
        assert response.headers["x-request-id"]

    async def test_the_page_limit_is_capped_by_the_plan(
        self, client: httpx.AsyncClient, org: dict[str, Any], site: FakeSite
    ) -> None:
        response = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/"), "page_limit": 5000},
            headers=auth(org["admin"]),
        )
        assert response.status_code == 201, response.text
        assert response.json()["page_limit"] == 50

    async def test_a_second_scan_of_a_site_being_scanned_is_a_conflict(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], site: FakeSite
    ) -> None:
        body = {"agent_id": str(org["agent"]["id"]), "start_url": site.url("/")}
        assert (await client.post("/api/scans", json=body, headers=auth(org["owner"]))).status_code == 201
        again = await client.post("/api/scans", json=body, headers=auth(org["owner"]))
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"
        assert await count(db, "scans", org["id"]) == 1
        assert await count(db, "sources", org["id"]) == 1

    async def test_a_plain_member_may_not(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], site: FakeSite
    ) -> None:
        response = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/")},
            headers=auth(org["member"]),
        )
        assert response.status_code == 403
        assert await count(db, "scans", org["id"]) == 0

    async def test_another_organizations_agent_is_not_found(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], site: FakeSite
    ) -> None:
        response = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/")},
            headers=auth(org["outsider"]),
        )
        assert response.status_code == 404
        assert await count(db, "scans", org["id"]) == 0

    async def test_no_token_no_scan(self, client: httpx.AsyncClient, org: dict[str, Any], site: FakeSite) -> None:
        response = await client.post(
            "/api/scans", json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/")}
        )
        assert response.status_code == 401

    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("http://169.254.169.254/latest/meta-data/", "metadata"),
            ("http://10.0.0.7/", "private_address"),
            ("http://localhost:8080/", "internal_name"),
            ("ftp://acme.example/", "scheme"),
            ("http://user:pw@acme.example/", "userinfo"),
            ("http://unknown-host.example/", "unresolvable"),
        ],
    )
    async def test_the_egress_guard_refuses_the_url_at_save(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any], url: str, reason: str
    ) -> None:
        response = await client.post(
            "/api/scans", json={"agent_id": str(org["agent"]["id"]), "start_url": url}, headers=auth(org["owner"])
        )
        assert response.status_code == 422, response.text
        assert response.json()["reason"] == reason
        assert response.json()["detail"] == CUSTOMER_MESSAGES[EgressReason(reason)], "it names the rule, nothing more"
        assert await count(db, "scans", org["id"]) == 0
        assert await count(db, "sources", org["id"]) == 0

    async def test_unknown_fields_are_refused(
        self, client: httpx.AsyncClient, org: dict[str, Any], site: FakeSite
    ) -> None:
        response = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/"), "org_id": str(uuid.uuid4())},
            headers=auth(org["owner"]),
        )
        assert response.status_code == 422
        assert response.json()["type"].endswith("validation-error")


class TestRead:
    async def test_members_read_progress_outsiders_get_404(
        self, client: httpx.AsyncClient, org: dict[str, Any], site: FakeSite
    ) -> None:
        created = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/")},
            headers=auth(org["owner"]),
        )
        scan_id = created.json()["id"]
        member = await client.get(f"/api/scans/{scan_id}", headers=auth(org["member"]))
        assert member.status_code == 200
        assert member.json()["id"] == scan_id
        assert (await client.get(f"/api/scans/{scan_id}", headers=auth(org["outsider"]))).status_code == 404
        assert (await client.get(f"/api/scans/{uuid.uuid4()}", headers=auth(org["owner"]))).status_code == 404


class TestCron:
    async def test_only_the_scheduler_may_run_the_worker(self, cron: httpx.AsyncClient) -> None:
        assert (await cron.get("/api/cron/scans")).status_code == 401
        wrong = await cron.get("/api/cron/scans", headers={"Authorization": "Bearer not-the-secret"})
        assert wrong.status_code == 401

    async def test_the_cron_runs_a_queued_scan_to_the_end(
        self, client: httpx.AsyncClient, cron: httpx.AsyncClient, db: Connection, org: dict[str, Any], site: FakeSite
    ) -> None:
        created = await client.post(
            "/api/scans",
            json={"agent_id": str(org["agent"]["id"]), "start_url": site.url("/"), "max_depth": 3},
            headers=auth(org["owner"]),
        )
        response = await cron.get("/api/cron/scans", headers={"Authorization": f"Bearer {CRON_SECRET}"})
        assert response.status_code == 200, response.text
        assert response.json()["completed"] == 1
        scan = (await client.get(f"/api/scans/{created.json()['id']}", headers=auth(org["member"]))).json()
        assert (scan["status"], scan["status_reason"]) == ("completed", "site_exhausted")
        assert scan["pages_fetched"] == len(STORED_PATHS)


def test_the_api_function_does_not_load_the_extractor_at_cold_start() -> None:
    # trafilatura and lxml are imported by the worker when it extracts a page, never by the POST path.
    probe = "import sys, functions.scan; print(sorted(m for m in ('trafilatura', 'lxml') if m in sys.modules))"
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
