"""Scans advancing in queue steps, on the SDK's embedded queue service, against the loopback site.

Each step message names a scan and a step; the subscriber registered here is the production one's
twin with the test site's environment (functions/queues/scan_steps.py passes the production one).
Real commits, the real pool, real Redis (per-host turns, robots.txt rules), fresh tenants.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from vercel.queue import Message, subscribe
from vercel.queue.embedded import embedded_queue_service
from vercel.queue.testing import clear_subscriptions

from shared.db.session import get_database
from shared.queues import SCAN_STEPS_CONSUMER, SCAN_STEPS_TOPIC, QueueEnvironment, come_back, publish
from shared.scans import ScanCreate, ScanEnvironment, create_scan
from shared.scans.worker import on_message, run_step
from tests.conftest import Connection
from tests.factories import create_agent, create_org, user_claims
from tests.fakes.site import STORED_PATHS, FakeSite, acme_site, generated_site, running_acme_site, running_site

pytestmark = pytest.mark.usefixtures("committed_db")


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
    return ScanEnvironment(
        policy=site.policy(),
        resolver=site.resolver(),
        politeness_seconds=0.02,
        step_seconds=0.25,  # a few pages per step: a scan of this site takes several steps
        lease_seconds=10,  # a step's lease is renewed only by its one flush: longer than any step here
        concurrency=1,
    )


@pytest.fixture
async def tenants(db: Connection) -> AsyncIterator[list[dict[str, Any]]]:
    """Committed agents in fresh organizations, deleted afterwards."""
    made: list[dict[str, Any]] = []
    yield made
    await db.execute("reset role")
    for agent in made:
        await db.execute("delete from public.organizations where id = %s", (agent["org_id"],))
    await db.commit()


async def new_agent(db: Connection, tenants: list[dict[str, Any]]) -> dict[str, Any]:
    await db.execute("reset role")
    org = await create_org(db)
    agent = await create_agent(db, org)
    await db.commit()
    agent["owner"] = org["owner"]
    tenants.append(agent)
    return agent


async def start_scan(agent: dict[str, Any], site: FakeSite, env: ScanEnvironment, queue: QueueEnvironment) -> uuid.UUID:
    request = ScanCreate(agent_id=agent["id"], start_url=site.url("/"), max_depth=3)
    claims = user_claims(agent["owner"])
    scan = await create_scan(get_database(), claims, request, env=env, queue=queue, request_id=None)
    return scan.id


class Stepper:
    """The ``scan-steps`` subscriber with the test site's environment; counts the steps it claimed."""

    def __init__(self, env: ScanEnvironment, queue: QueueEnvironment) -> None:
        self.claimed = 0
        self.handled = 0

        @subscribe(topic=SCAN_STEPS_TOPIC, consumer_group=SCAN_STEPS_CONSUMER)
        async def take_scan_step(message: Message[dict[str, object]]) -> None:
            self.handled += 1
            payload = message.payload
            step = payload["step"]
            assert isinstance(step, int)
            report, back = await run_step(
                get_database(), uuid.UUID(str(payload["scan_id"])), step, env=env, queue=queue
            )
            self.claimed += report.claimed
            come_back(back)

        self.handler = take_scan_step  # the SDK keeps only a weak reference


@asynccontextmanager
async def running_queue() -> AsyncIterator[QueueEnvironment]:
    clear_subscriptions()
    try:
        async with embedded_queue_service() as service:
            yield QueueEnvironment(client=service.get_async_client)
    finally:
        clear_subscriptions()


async def scan_row(db: Connection, scan_id: uuid.UUID) -> dict[str, Any]:
    await db.execute("reset role")
    row = await (await db.execute("select * from public.scans where id = %s", (scan_id,))).fetchone()
    await db.commit()
    assert row is not None
    return dict(row)


async def until_finished(db: Connection, scan_ids: list[uuid.UUID], seconds: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        rows = [await scan_row(db, scan_id) for scan_id in scan_ids]
        if all(row["status"] not in ("queued", "running") for row in rows):
            return rows
        assert time.monotonic() < deadline, f"unfinished: {[(r['status'], r['step']) for r in rows]}"
        await asyncio.sleep(0.05)


async def stored_twice(db: Connection, scan_id: uuid.UUID) -> list[Any]:
    await db.execute("reset role")
    cursor = await db.execute(
        "select url, content from public.knowledge_chunks where scan_id = %s group by url, content having count(*) > 1",
        (scan_id,),
    )
    duplicates = await cursor.fetchall()
    await db.commit()
    return duplicates


async def stored_paths(db: Connection, site: FakeSite, scan_id: uuid.UUID) -> set[str]:
    await db.execute("reset role")
    cursor = await db.execute("select distinct url from public.knowledge_chunks where scan_id = %s", (scan_id,))
    found = {row["url"].removeprefix(site.origin) for row in await cursor.fetchall()}
    await db.commit()
    return found


class TestSteps:
    async def test_a_scan_advances_one_step_per_message_to_the_end(
        self, db: Connection, site: FakeSite, env: ScanEnvironment, tenants: list[dict[str, Any]]
    ) -> None:
        agent = await new_agent(db, tenants)
        async with running_queue() as queue:
            stepper = Stepper(env, queue)
            scan_id = await start_scan(agent, site, env, queue)
            [row] = await until_finished(db, [scan_id])

        assert (row["status"], row["status_reason"]) == ("completed", "site_exhausted")
        assert row["step"] >= 2, "the scan took several steps"
        assert stepper.claimed == row["step"] + 1, "each step claimed once: the released ones and the last"
        assert await stored_paths(db, site, scan_id) == STORED_PATHS
        hits = site.page_hits()
        assert set(hits) >= STORED_PATHS
        assert all(n == 1 for n in hits.values()), f"a page was requested twice: {hits}"
        assert site.hits["/robots.txt"] == 1, "robots.txt is read once per scan, not once per step"

    async def test_a_duplicate_step_message_is_dropped(
        self, db: Connection, site: FakeSite, env: ScanEnvironment, tenants: list[dict[str, Any]]
    ) -> None:
        agent = await new_agent(db, tenants)
        async with running_queue() as queue:
            stepper = Stepper(env, queue)
            scan_id = await start_scan(agent, site, env, queue)
            # At least once: step 0 is named by a second message, which must not start a second chain.
            assert await publish(queue, SCAN_STEPS_TOPIC, {"scan_id": str(scan_id), "step": 0})
            [row] = await until_finished(db, [scan_id])
            await asyncio.sleep(0.3)

        assert row["status"] == "completed"
        assert stepper.claimed == row["step"] + 1, f"the duplicate claimed something: {row['crash_count']} crashes"
        assert stepper.handled == stepper.claimed + 1
        assert all(n == 1 for n in site.page_hits().values())
        assert await stored_twice(db, scan_id) == []

    async def test_a_message_that_names_no_step_is_dropped(self) -> None:
        assert await on_message(get_database(), {"scan_id": str(uuid.uuid4())}) is None
        assert await on_message(get_database(), {"scan_id": "nope", "step": 0}) is None
        assert await on_message(get_database(), {"scan_id": str(uuid.uuid4()), "step": 0}) is None


class TestKilledMidStep:
    async def test_the_lease_expires_another_resumes_and_nothing_is_stored_twice(
        self, db: Connection, site: FakeSite, env: ScanEnvironment, tenants: list[dict[str, Any]]
    ) -> None:
        agent = await new_agent(db, tenants)
        long_step = replace(env, step_seconds=30, flush_pages=2, lease_seconds=1, politeness_seconds=0.1)
        # Queued with no queue reachable: the step-0 message exists only in the invocation killed below.
        scan_id = await start_scan(agent, site, long_step, QueueEnvironment())
        step = asyncio.create_task(run_step(get_database(), scan_id, 0, env=long_step))
        await _until(lambda: sum(site.page_hits().values()) >= 6, "the step did not get going")
        step.cancel()  # killed mid-step: no release, the lease stays held
        with pytest.raises(asyncio.CancelledError):
            await step
        first = site.page_hits()

        async with running_queue() as queue:
            stepper = Stepper(env, queue)
            # The queue delivers the killed invocation's message again; the step's lease is still live,
            # so it comes back when the lease has expired and then resumes from the last flush.
            assert await publish(queue, SCAN_STEPS_TOPIC, {"scan_id": str(scan_id), "step": 0})
            [row] = await until_finished(db, [scan_id])

        assert (row["status"], row["crash_count"]) == ("completed", 1)
        assert stepper.handled > stepper.claimed, "the first delivery found the lease live and came back"
        hits = site.page_hits()
        refetched = [path for path, n in hits.items() if n > 1]
        assert all(hits[path] == 2 for path in refetched)
        assert len(refetched) <= 4, f"more than the unsaved batch was fetched again: {refetched} after {first}"
        assert await stored_twice(db, scan_id) == [], "a page fetched again must not be stored twice"
        assert await stored_paths(db, site, scan_id) == STORED_PATHS


class TestPolitenessAcrossInvocations:
    async def test_two_scans_of_one_host_never_overlap_their_requests(
        self, db: Connection, env: ScanEnvironment, tenants: list[dict[str, Any]]
    ) -> None:
        # Plain pages, each read to the end, that take a while to answer: the server's count of
        # requests in flight is then exactly the crawler's.
        pages = {path: replace(reply, delay_seconds=0.03) for path, reply in generated_site(12).items()}
        with running_site(pages) as site:
            polite = replace(env, policy=site.policy(), resolver=site.resolver(), politeness_seconds=0.15)
            first, second = await new_agent(db, tenants), await new_agent(db, tenants)
            async with running_queue() as queue:
                stepper = Stepper(polite, queue)  # the embedded service runs the two scans' steps in parallel
                scans = [await start_scan(agent, site, polite, queue) for agent in (first, second)]
                rows = await until_finished(db, scans, 90)

        assert [row["status"] for row in rows] == ["completed", "completed"]
        assert stepper.claimed >= 4, "both scans advanced in steps"
        assert site.max_in_flight == 1, "two requests were in flight to the host at once"
        arrivals = sorted(t for t, _ in site.times)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        # Arrival times are taken by the site's thread, which a busy machine can run late: the pause is
        # held at the median, and no two requests ever come close to arriving together.
        assert statistics.median(gaps) >= 0.15, f"requests to the host came {statistics.median(gaps):.3f} s apart"
        assert min(gaps) >= 0.05, f"two requests to the host came {min(gaps):.3f} s apart"


async def _until(condition: Callable[[], bool], message: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.02)
