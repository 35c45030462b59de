"""After a scan of the test site, the widget's hybrid search finds the page that answers a question
phrased differently from the page's own text.

What each test proves, honestly:

* offline (no model key): full-text search with English stemming, any of the question's words,
  fuller matches first. It matches other *forms* of the page's words ("refunds on returned bikes"
  finds "refund", "returned", "Bikes") in another order and sentence; it does not know synonyms.
* with embeddings: the loopback provider's vectors are hashes of the text, with no notion of
  meaning. The test declares that the question means what the returns chunk means (it gives the
  question that chunk's stored vector, slightly perturbed), then proves the rest for real: the
  scan stored each chunk's vector, the question's embedding goes through the gateway, and the
  vector half of the hybrid search finds the page although the question shares no searchable
  word with it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shared.gateway import close_clients, embed
from shared.redis import close_redis
from shared.retrieval import search_knowledge
from shared.scans import ScanCreate, ScanEnvironment, create_scan, run_scans
from shared.settings import get_settings
from tests.conftest import Connection, TransactionDatabase
from tests.factories import create_agent, create_org, user_claims
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai
from tests.fakes.site import FakeSite, running_acme_site


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
    fake_openai.reset()
    url, token = redis_bridge
    for name, value in {
        "OPENAI_API_KEY": fake_openai.api_key,
        "OPENAI_BASE_URL": fake_openai.base_url,
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


async def scanned_agent(db: Connection, site: FakeSite) -> dict[str, Any]:
    site.reset()
    org = await create_org(db)
    agent = await create_agent(db, org)
    env = ScanEnvironment(
        stale_after_seconds=0, policy=site.policy(), resolver=site.resolver(), politeness_seconds=0, concurrency=1
    )
    tdb = TransactionDatabase(db)
    body = ScanCreate(agent_id=agent["id"], start_url=site.url("/"), max_depth=3)
    await create_scan(tdb, user_claims(org["owner"]), body, env=env, request_id=None)
    report = await run_scans(tdb, env=env)
    assert report.completed == 1
    return {**agent, "org": org}


async def test_full_text_with_stemming_finds_the_returns_page(db: Connection, site: FakeSite) -> None:
    agent = await scanned_agent(db, site)
    await db.execute("reset role")
    # Not the page's wording: "refunds", "returned", "bikes" against "refund", "be returned", "Acme Bikes".
    found = await search_knowledge(
        TransactionDatabase(db), agent_id=agent["id"], query="refunds on returned bikes", query_embedding=None
    )
    assert found, "nothing found"
    assert found[0].url == site.url("/returns")
    assert found[0].title == "Return policy"


async def test_the_vector_half_finds_the_page_with_no_word_in_common(
    db: Connection, site: FakeSite, online: FakeOpenAI
) -> None:
    agent = await scanned_agent(db, site)
    await db.execute("reset role")
    stored = await (
        await db.execute(
            "select embedding::text as embedding from public.knowledge_chunks where agent_id = %s and url = %s",
            (agent["id"], site.url("/returns")),
        )
    ).fetchone()
    assert stored is not None
    assert stored["embedding"] is not None, "the scan stored the chunk's vector"
    question = "Any reimbursement?"
    page_vector = [float(x) for x in stored["embedding"].strip("[]").split(",")]
    nudged = [x + (0.01 if i % 2 else -0.01) for i, x in enumerate(page_vector)]
    norm = math.sqrt(sum(x * x for x in nudged))
    online.vectors[question] = [x / norm for x in nudged]

    tdb = TransactionDatabase(db)
    vectors = await embed(
        tdb, org_id=agent["org_id"], agent_id=agent["id"], scan_id=None, texts=[question], request_id="req_q"
    )
    assert vectors is not None
    await db.execute("reset role")
    assert (
        await search_knowledge(TransactionDatabase(db), agent_id=agent["id"], query=question, query_embedding=None)
        == []
    ), "full text alone cannot find it: the question shares no searchable word with the page"
    found = await search_knowledge(
        TransactionDatabase(db), agent_id=agent["id"], query=question, query_embedding=vectors[0]
    )
    assert found[0].url == site.url("/returns")
