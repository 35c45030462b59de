"""The scan worker against the real Postgres and Redis, and the customer's site on loopback
(tests/fakes/site.py), reached through the egress guard with an exact test exception.

Each test queues its scan with ``create_scan`` and runs ``run_scans`` as the cron does; the site
counts every request per path, so "fetched once" is observed at the server, not inferred.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from shared.db.session import get_database
from shared.scans import ScanCreate, ScanEnvironment, ScanOut, create_scan, run_scans
from tests.conftest import ROOT, Connection, TransactionDatabase
from tests.factories import create_agent, create_org, user_claims
from tests.fakes.site import (
    EXPECTED_SKIPS,
    NEVER_REQUESTED,
    PRIVATE_ALIAS,
    STORED_PATHS,
    FakeSite,
    Reply,
    acme_site,
    running_acme_site,
)


@pytest.fixture(scope="module")
def site() -> Iterator[FakeSite]:
    with running_acme_site() as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_site(site: FakeSite) -> None:
    site.pages.update({k: v for k, v in acme_site().items() if k != "/moved-in"})
    site.reset()


@pytest.fixture
def env(site: FakeSite) -> ScanEnvironment:
    # One lane: the tests' Database is one connection in one transaction.
    return ScanEnvironment(
        stale_after_seconds=0, policy=site.policy(), resolver=site.resolver(), politeness_seconds=0, concurrency=1
    )


@pytest.fixture
def tdb(db: Connection) -> TransactionDatabase:
    return TransactionDatabase(db)


async def queue(
    db: Connection, site: FakeSite, env: ScanEnvironment, *, agent: dict[str, Any] | None = None, **body: Any
) -> ScanOut:
    if agent is None:
        org = await create_org(db)
        agent = await create_agent(db, org)
        agent["owner"] = org["owner"]
    request = ScanCreate(agent_id=agent["id"], start_url=site.url("/"), **{"max_depth": 3, **body})
    return await create_scan(TransactionDatabase(db), user_claims(agent["owner"]), request, env=env, request_id=None)


async def one(db: Connection, query: str, *params: Any) -> dict[str, Any]:
    await db.execute("reset role")
    row = await (await db.execute(query, params)).fetchone()
    assert row is not None
    return dict(row)


async def rows(db: Connection, query: str, *params: Any) -> list[dict[str, Any]]:
    await db.execute("reset role")
    return [dict(r) for r in await (await db.execute(query, params)).fetchall()]


async def scan_row(db: Connection, scan_id: uuid.UUID) -> dict[str, Any]:
    return await one(db, "select * from public.scans where id = %s", scan_id)


async def chunk_paths(db: Connection, site: FakeSite, scan_id: uuid.UUID) -> set[str]:
    found = await rows(db, "select distinct url from public.knowledge_chunks where scan_id = %s", scan_id)
    return {r["url"].removeprefix(site.origin) for r in found}


def assert_counts_add_up(row: dict[str, Any]) -> None:
    assert row["pages_found"] == row["pages_fetched"] + row["pages_skipped"] + row["pages_failed"], (
        "every page found must end stored, skipped or failed"
    )
    assert sum(row["skip_reasons"].values()) == row["pages_skipped"] + row["pages_failed"], (
        "every skipped or failed page must have a reason"
    )


class TestTheTestSite:
    async def test_the_right_pages_land_as_chunks(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        report = await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert (report.claimed, report.completed) == (1, 1)
        assert (row["status"], row["status_reason"]) == ("completed", "site_exhausted")
        assert await chunk_paths(db, site, scan.id) == STORED_PATHS
        assert row["pages_fetched"] == len(STORED_PATHS)
        assert_counts_add_up(row)

    async def test_the_wrong_pages_are_skipped_with_their_reasons(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert row["skip_reasons"] == EXPECTED_SKIPS
        assert row["pages_failed"] == 1, "/flaky (500) is a failure, not a skip"

    async def test_every_page_is_requested_at_most_once_and_forbidden_ones_never(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        await run_scans(tdb, env=env)
        hits = site.page_hits()
        assert max(hits.values()) == 1, f"a page was fetched twice: {hits}"
        assert not NEVER_REQUESTED & set(hits), "robots-disallowed, binary, too deep or refused pages were requested"
        assert site.hits["/robots.txt"] == 1
        # The same-site name that resolves into a private range was looked up and refused before
        # any connection (the guard dials only vetted addresses).
        assert PRIVATE_ALIAS in env.resolver.lookups  # type: ignore[union-attr]
        assert (await scan_row(db, scan.id))["skip_reasons"]["egress_private_address"] == 1

    async def test_chunks_hold_the_main_text_not_the_chrome(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        await run_scans(tdb, env=env)
        chunks = await rows(
            db,
            "select content, title, embedding, content_hash from public.knowledge_chunks"
            " where scan_id = %s and url = %s",
            scan.id,
            site.url("/returns"),
        )
        assert len(chunks) == 1
        assert "returned within 30 days" in chunks[0]["content"]
        assert "All rights reserved" not in chunks[0]["content"], "the footer is boilerplate"
        assert chunks[0]["title"] == "Return policy"
        assert chunks[0]["embedding"] is None, "the offline provider stores chunks for full-text search only"
        assert chunks[0]["content_hash"] is not None

    async def test_a_clear_user_agent_and_a_polite_delay_per_host(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        polite = replace(env, politeness_seconds=0.15)
        await queue(db, site, polite, page_limit=4)
        await run_scans(tdb, env=polite)
        assert any("HiredHandsBot" in agent for agent in site.user_agents)
        times = [t for t, _ in site.times]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(gaps) >= 4
        assert min(gaps) >= 0.14, f"requests to one host closer than the politeness delay: {gaps}"

    async def test_the_page_limit_stops_the_scan_and_counts_what_was_left(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env, page_limit=3)
        await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert (row["status"], row["status_reason"]) == ("completed", "page_limit")
        assert row["pages_visited"] == 3
        assert sum(site.page_hits().values()) == 3
        assert row["skip_reasons"]["page_limit"] > 0
        assert row["frontier"] == []
        assert_counts_add_up(row)

    async def test_a_site_that_forbids_us_everything_fails_with_a_reason(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        site.pages["/robots.txt"] = Reply(body=b"User-agent: HiredHandsBot\nDisallow: /\n", content_type="text/plain")
        scan = await queue(db, site, env)
        await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert (row["status"], row["status_reason"]) == ("failed", "start_url_failed")
        assert "robots" in row["error"]
        assert site.page_hits() == {}

    async def test_robots_txt_that_cannot_be_read_means_complete_disallow(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        site.pages["/robots.txt"] = Reply(503, b"down")
        scan = await queue(db, site, env)
        await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert row["skip_reasons"] == {"robots_unreachable": 1}
        assert site.page_hits() == {}


class TestResumption:
    async def test_out_of_time_then_resumed_every_page_fetched_once(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        # A few pages per invocation: each one stops at its time budget and the next resumes.
        short = replace(env, politeness_seconds=0.05, time_budget_seconds=0.3, flush_pages=2)
        scan = await queue(db, site, short)
        invocations = 0
        while (await scan_row(db, scan.id))["status"] in ("queued", "running"):
            invocations += 1
            assert invocations < 60, "the scan never finished"
            report = await run_scans(tdb, env=short)
            assert report.claimed == 1
        row = await scan_row(db, scan.id)
        assert invocations > 2, "the scan should have needed several invocations"
        assert (row["status"], row["status_reason"]) == ("completed", "site_exhausted")
        hits = site.page_hits()
        assert set(hits.values()) == {1}, f"a page was fetched more than once across invocations: {hits}"
        assert await chunk_paths(db, site, scan.id) == STORED_PATHS
        assert row["skip_reasons"] == EXPECTED_SKIPS
        assert row["crash_count"] == 0, "paused scans are released, not abandoned"

    async def test_a_released_scan_keeps_its_chunks_out_of_the_agent_until_it_ends(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        short = replace(env, politeness_seconds=0.05, time_budget_seconds=0.2, flush_pages=1)
        scan = await queue(db, site, short)
        await run_scans(tdb, env=short)
        row = await scan_row(db, scan.id)
        assert row["status"] == "running"
        assert row["lease_owner"] is None, "released for the next invocation, not abandoned"
        staged = await one(db, "select count(*) as n from private.scan_chunks where scan_id = %s", scan.id)
        assert staged["n"] > 0
        assert await chunk_paths(db, site, scan.id) == set(), "a scan in progress publishes nothing"


class TestRescan:
    async def test_a_completed_rescan_replaces_the_sources_chunks_at_once(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        first = await queue(db, site, env)
        await run_scans(tdb, env=env)
        agent = await one(
            db,
            "select a.*, o.created_by as owner_id from public.agents a join public.organizations o"
            " on o.id = a.org_id where a.id = %s",
            first.agent_id,
        )
        agent["owner"] = {"id": agent["owner_id"], "email": "owner@example.test"}
        site.pages["/about"] = site.pages["/contact"] = Reply(404, b"gone")
        site.reset()
        short = replace(env, time_budget_seconds=0.15, politeness_seconds=0.05, flush_pages=1)
        second = await queue(db, site, short, agent=agent)
        assert second.source_id == first.source_id, "a rescan of the same URL reuses its source"
        await run_scans(tdb, env=short)
        # Mid-rescan: the agent still has exactly the first scan's knowledge.
        assert await chunk_paths(db, site, first.id) == STORED_PATHS
        assert await chunk_paths(db, site, second.id) == set()
        while (await scan_row(db, second.id))["status"] == "running":
            await run_scans(tdb, env=short)
        assert await chunk_paths(db, site, first.id) == set(), "the old chunks went in the same transaction"
        assert await chunk_paths(db, site, second.id) == STORED_PATHS - {"/about", "/contact"}
        source = await one(db, "select * from public.knowledge_sources where id = %s", first.source_id)
        assert source["last_scanned_at"] is not None

    async def test_a_failed_rescan_leaves_the_knowledge_as_it_was(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        first = await queue(db, site, env)
        await run_scans(tdb, env=env)
        before = await rows(
            db, "select id from public.knowledge_chunks where source_id = %s order by id", first.source_id
        )
        agent = await one(
            db,
            "select a.*, o.created_by as owner_id from public.agents a join public.organizations o"
            " on o.id = a.org_id where a.id = %s",
            first.agent_id,
        )
        agent["owner"] = {"id": agent["owner_id"], "email": "owner@example.test"}
        site.pages["/"] = Reply(500, b"down")
        second = await queue(db, site, env, agent=agent)
        await run_scans(tdb, env=env)
        row = await scan_row(db, second.id)
        assert (row["status"], row["status_reason"]) == ("failed", "start_url_failed")
        after = await rows(
            db, "select id from public.knowledge_chunks where source_id = %s order by id", first.source_id
        )
        assert after == before


class TestLeases:
    async def test_a_scan_held_by_a_live_lease_is_not_claimed_twice(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        await db.execute("reset role")
        await db.execute(
            "update public.scans set status = 'running', lease_owner = 'other',"
            " lease_expires_at = now() + interval '1 minute' where id = %s",
            (scan.id,),
        )
        report = await run_scans(tdb, env=env)
        assert report.claimed == 0
        assert site.page_hits() == {}

    async def test_an_expired_lease_is_resumed_and_counted_as_a_crash(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        await db.execute("reset role")
        await db.execute(
            "update public.scans set status = 'running', lease_owner = 'dead',"
            " lease_expires_at = now() - interval '1 second' where id = %s",
            (scan.id,),
        )
        await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert (row["status"], row["crash_count"]) == ("completed", 1)

    async def test_a_scan_that_keeps_killing_its_worker_is_failed(
        self, db: Connection, tdb: TransactionDatabase, site: FakeSite, env: ScanEnvironment
    ) -> None:
        scan = await queue(db, site, env)
        await db.execute("reset role")
        await db.execute(
            "update public.scans set status = 'running', lease_owner = 'dead', crash_count = %s,"
            " lease_expires_at = now() - interval '1 second' where id = %s",
            (env.max_crashes, scan.id),
        )
        await run_scans(tdb, env=env)
        row = await scan_row(db, scan.id)
        assert (row["status"], row["status_reason"]) == ("failed", "worker_crashed")
        assert site.page_hits() == {}


_KILLED_WORKER = """
import asyncio, sys
from shared.db.session import get_database
from shared.scans import ScanEnvironment, run_scans
from tests.fakes.site import SiteResolver, FakeSite
site = FakeSite({})
site.port = int(sys.argv[1])
env = ScanEnvironment(stale_after_seconds=0, policy=site.policy(), resolver=site.resolver(), politeness_seconds=0.1,
                      lease_seconds=1, time_budget_seconds=60, flush_pages=2, concurrency=1)
asyncio.run(run_scans(get_database(), env=env))
"""


@pytest.mark.usefixtures("committed_db")
class TestKilledWorker:
    async def test_a_killed_worker_is_replaced_after_its_lease_and_nothing_is_stored_twice(
        self, db: Connection, site: FakeSite, env: ScanEnvironment
    ) -> None:
        # Committed tenants: the killed process and this one share the real database.
        await db.execute("reset role")
        org = await create_org(db)
        agent = await create_agent(db, org)
        await db.commit()
        agent["owner"] = org["owner"]
        scan = await create_scan(
            get_database(),
            user_claims(org["owner"]),
            ScanCreate(agent_id=agent["id"], start_url=site.url("/"), max_depth=3),
            env=env,
            request_id=None,
        )
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _KILLED_WORKER, str(site.port), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        try:
            deadline = time.monotonic() + 30
            while sum(site.page_hits().values()) < 7:
                assert time.monotonic() < deadline, "the worker did not get going"
                assert worker.returncode is None, "the worker ended by itself"
                await asyncio.sleep(0.02)
        finally:
            worker.send_signal(signal.SIGKILL)
            await worker.wait()
        first_hits = site.page_hits()
        await asyncio.sleep(1.1)  # its lease (1 s) expires; nobody released it
        await run_scans(get_database(), env=replace(env, concurrency=2))

        row = await scan_row(db, scan.id)
        assert (row["status"], row["crash_count"]) == ("completed", 1)
        hits = site.page_hits()
        assert set(hits) >= STORED_PATHS
        refetched = [path for path, n in hits.items() if n > 1]
        assert all(hits[path] == 2 for path in refetched)
        # At most the unsaved batch (flush_pages = 2 visits, a redirect chain counting its hops) and
        # the page in flight.
        assert len(refetched) <= 4, f"more than the unsaved batch was fetched again: {refetched} after {first_hits}"
        duplicates = await rows(
            db,
            "select url, content, count(*) as n from public.knowledge_chunks where scan_id = %s"
            " group by url, content having count(*) > 1",
            scan.id,
        )
        assert duplicates == [], "a page fetched again must not be stored twice"
        assert await chunk_paths(db, site, scan.id) == STORED_PATHS
        await db.execute("delete from public.organizations where id = %s", (org["id"],))
        await db.commit()


@pytest.mark.usefixtures("committed_db")
class TestSharedQueue:
    async def test_concurrent_invocations_split_the_queue_and_never_work_one_scan_twice(
        self, db: Connection, site: FakeSite, env: ScanEnvironment
    ) -> None:
        await db.execute("reset role")
        orgs, scans = [], []
        for _ in range(3):
            org = await create_org(db)
            agent = await create_agent(db, org)
            orgs.append(org)
            await db.commit()
            body = ScanCreate(agent_id=agent["id"], start_url=site.url("/"), max_depth=3)
            scans.append(await create_scan(get_database(), user_claims(org["owner"]), body, env=env, request_id=None))
        parallel = replace(env, concurrency=2)
        reports = await asyncio.gather(*(run_scans(get_database(), env=parallel) for _ in range(2)))
        assert sum(r.claimed for r in reports) == 3, "each scan claimed once, by one of the invocations"
        assert sum(r.completed for r in reports) == 3
        for scan in scans:
            row = await scan_row(db, scan.id)
            assert (row["status"], row["crash_count"]) == ("completed", 0)
            assert await chunk_paths(db, site, scan.id) == STORED_PATHS
        assert set(site.page_hits().values()) == {3}, "every page once per scan, never more"
        for org in orgs:
            await db.execute("delete from public.organizations where id = %s", (org["id"],))
        await db.commit()
