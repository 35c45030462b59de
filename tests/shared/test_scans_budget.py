"""Scans and the model budget: embeddings go through the gateway, batched, budgeted and metered.

The provider is the loopback OpenAI-compatible server (tests/fakes/openai_server.py), configured
through the environment exactly as production reaches OpenAI (``OPENAI_API_KEY``,
``OPENAI_BASE_URL``); the site is tests/fakes/site.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from shared.gateway import BURST_BUCKET, close_clients
from shared.redis import close_redis
from shared.scans import ScanCreate, ScanEnvironment, create_scan, run_scans
from shared.settings import get_settings
from tests.conftest import Connection, TransactionDatabase, forget_keys
from tests.factories import create_agent, create_org, user_claims
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai
from tests.fakes.site import STORED_PATHS, FakeSite, running_acme_site


@pytest.fixture(scope="module")
def site() -> Iterator[FakeSite]:
    with running_acme_site() as running:
        yield running


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture
async def online(
    monkeypatch: pytest.MonkeyPatch, fake_openai: FakeOpenAI, redis_bridge: tuple[str, str]
) -> AsyncIterator[FakeOpenAI]:
    """The gateway configured with a model key, pointing at the loopback provider."""
    fake_openai.reset()
    url, token = redis_bridge
    for name, value in {
        "OPENAI_API_KEY": fake_openai.api_key,
        "OPENAI_BASE_URL": fake_openai.base_url,
        "MODEL_TIMEOUT_SECONDS": "5",
        "UPSTASH_REDIS_REST_URL": url,
        "UPSTASH_REDIS_REST_TOKEN": token,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    await close_redis()
    yield fake_openai
    await close_clients()
    await close_redis()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def env(site: FakeSite) -> ScanEnvironment:
    site.reset()
    return ScanEnvironment(
        policy=site.policy(),
        resolver=site.resolver(),
        politeness_seconds=0,
        concurrency=1,
        flush_pages=1,
        stale_after_seconds=0,
    )


@pytest.fixture
async def org(db: Connection, direct_redis: redis.Redis) -> AsyncIterator[dict[str, Any]]:
    created = await create_org(db)
    created["agent"] = await create_agent(db, created)
    yield created
    forget_keys(direct_redis, f"hh:rl:{BURST_BUCKET}:{created['id']}:*")


async def rows(db: Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    await db.execute("reset role")
    return [dict(r) for r in await (await db.execute(query, params)).fetchall()]


async def queue_and_run(db: Connection, org: dict[str, Any], site: FakeSite, env: ScanEnvironment) -> dict[str, Any]:
    tdb = TransactionDatabase(db)
    body = ScanCreate(agent_id=org["agent"]["id"], start_url=site.url("/"), max_depth=3)
    scan = await create_scan(tdb, user_claims(org["owner"]), body, env=env, request_id=None)
    await run_scans(tdb, env=env, request_id="req_scan_test")
    return (await rows(db, "select * from public.scans where id = %s", scan.id))[0]


async def set_budget(db: Connection, org_id: uuid.UUID, microusd: int) -> None:
    await db.execute("reset role")
    await db.execute(
        "update public.organization_limits set monthly_budget_microusd = %s where org_id = %s", (microusd, org_id)
    )


class TestEmbeddings:
    async def test_chunks_are_embedded_in_batches_and_metered_per_call(
        self, db: Connection, org: dict[str, Any], site: FakeSite, env: ScanEnvironment, online: FakeOpenAI
    ) -> None:
        batched = replace(env, flush_pages=4)
        scan = await queue_and_run(db, org, site, batched)
        assert scan["status"] == "completed"
        chunks = await rows(db, "select embedding from public.knowledge_chunks where scan_id = %s", scan["id"])
        assert chunks
        assert all(c["embedding"] is not None for c in chunks), "every chunk has its vector"
        calls = online.requests_to("/v1/embeddings")
        assert len(calls) < len(chunks), "chunks of several pages go in one call"
        assert all(call.body["model"] == "text-embedding-3-small" for call in calls)
        usage = await rows(db, "select * from public.usage_events where org_id = %s order by id", org["id"])
        assert [u["kind"] for u in usage] == ["embedding"] * len(calls)
        assert {u["scan_id"] for u in usage} == {scan["id"]}
        assert {u["outcome"] for u in usage} == {"ok"}


class TestBudget:
    async def test_a_scan_that_would_pass_the_budget_stops_keeps_its_chunks_and_is_metered(
        self, db: Connection, org: dict[str, Any], site: FakeSite, env: ScanEnvironment, online: FakeOpenAI
    ) -> None:
        # One page per call; each reserves 2-8 micro-dollars and spends 1-2: room for the first two
        # calls, not the third (docs/gateway.md: a call reserves its upper bound).
        await set_budget(db, org["id"], 10)
        scan = await queue_and_run(db, org, site, env)

        assert (scan["status"], scan["status_reason"]) == ("budget_exhausted", "budget_exhausted")
        assert "budget" in scan["error"]
        usage = await rows(db, "select * from public.usage_events where org_id = %s order by id", org["id"])
        answered = [u for u in usage if u["outcome"] == "ok"]
        refused = [u for u in usage if u["outcome"] == "rejected"]
        assert answered, "some embeddings fit in the budget"
        assert len(refused) == 1, "the refused call is on record, once"
        assert refused[0]["cost_microusd"] == 0
        assert len(online.requests_to("/v1/embeddings")) == len(answered), "the refused call never reached the model"
        period = (await rows(db, "select * from public.budget_periods where org_id = %s", org["id"]))[0]
        assert period["spent_microusd"] == sum(u["cost_microusd"] for u in answered), "metered for what it spent"
        assert period["reserved_microusd"] == 0, "no hold left behind"

        chunks = await rows(
            db, "select url, embedding from public.knowledge_chunks where scan_id = %s order by id", scan["id"]
        )
        embedded = [c for c in chunks if c["embedding"] is not None]
        assert len(embedded) >= len(answered), "the chunks embedded before the refusal are kept, with vectors"
        assert len(chunks) > len(embedded), "the batch in hand is kept for full-text search"
        stored = {c["url"].removeprefix(site.origin) for c in chunks}
        assert stored < STORED_PATHS, "the scan stopped before the end of the site"
        assert scan["pages_fetched"] == len(stored)
        assert scan["frontier"] != [], "what was left to do is still on record"

    async def test_with_no_budget_left_the_scan_stores_text_and_says_why(
        self, db: Connection, org: dict[str, Any], site: FakeSite, env: ScanEnvironment, online: FakeOpenAI
    ) -> None:
        await set_budget(db, org["id"], 0)
        scan = await queue_and_run(db, org, site, env)
        assert scan["status"] == "budget_exhausted"
        assert online.requests_to("/v1/embeddings") == []
        chunks = await rows(db, "select embedding from public.knowledge_chunks where scan_id = %s", scan["id"])
        assert len(chunks) == 1
        assert chunks[0]["embedding"] is None
