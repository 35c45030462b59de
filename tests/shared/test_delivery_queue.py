"""Deliveries through Vercel Queues: one message per delivery, on the SDK's embedded queue service.

The queue is the SDK's own emulation (``vercel.queue.embedded.embedded_queue_service``): messages
are sent through ``QueueClient``, stored, leased and pushed to the subscriber through
``accept_and_handle``, and acknowledged or retried by the SDK, as on the platform. The subscriber
registered here is the production one's twin, with the loopback providers instead of the real
ones (functions/queues/deliveries.py passes the production environment). Real commits, the real
pool, fresh tenants.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from vercel.queue import Message, subscribe
from vercel.queue.embedded import embedded_queue_service
from vercel.queue.testing import clear_subscriptions

from shared.connections import delivery, outbox
from shared.connections.delivery import WorkerSettings, run_deliveries
from shared.connections.schemas import Credential
from shared.db.session import get_database
from shared.local.queue import subscriber_modules
from shared.queues import (
    DELIVERIES_CONSUMER,
    DELIVERIES_TOPIC,
    SCAN_STEPS_CONSUMER,
    SCAN_STEPS_TOPIC,
    QueueEnvironment,
    come_back,
    publish,
)
from tests.conftest import ROOT
from tests.fakes.providers import Answer, Fakes
from tests.shared import test_delivery as outbox_tests
from tests.shared.test_delivery import Connection, add_connection, add_item, deliveries, q, webhook_connection

# The outbox tests' fixtures: loopback providers, committed tenants, and the check that no log line
# carries a credential.
fakes = outbox_tests.fakes
admin = outbox_tests.admin
org = outbox_tests.org
_reset_and_check_logs = outbox_tests._reset_and_check_logs


class Subscriber:
    """The ``deliveries`` subscriber against the loopback providers; remembers what it was handed."""

    def __init__(self, fakes: Fakes, settings: WorkerSettings) -> None:
        self.handled: list[tuple[str, int]] = []  # (delivery_id, the queue's delivery count)

        @subscribe(topic=DELIVERIES_TOPIC, consumer_group=DELIVERIES_CONSUMER)
        async def send_delivery(message: Message[dict[str, object]]) -> None:
            self.handled.append((str(message.payload.get("delivery_id")), message.metadata.delivery_count))
            come_back(await delivery.on_message(get_database(), message.payload, env=fakes.env, settings=settings))

        self.handler = send_delivery  # the SDK keeps only a weak reference


@asynccontextmanager
async def running_queue() -> AsyncIterator[QueueEnvironment]:
    """The SDK's embedded queue service, with only this test's subscribers (entered in the test's own
    task: the service runs a task group)."""
    clear_subscriptions()
    try:
        async with embedded_queue_service() as service:
            yield QueueEnvironment(client=service.get_async_client)
    finally:
        clear_subscriptions()


def subscriber(fakes: Fakes, **settings: Any) -> Subscriber:
    return Subscriber(fakes, WorkerSettings(**settings))


async def until(condition: Callable[[], Any], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await _truthy(condition()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _truthy(value: Any) -> bool:
    return bool(await value) if asyncio.iscoroutine(value) else bool(value)


async def status(admin: Connection, org: dict[str, Any]) -> list[str]:
    return [row["status"] for row in await deliveries(admin, org)]


class TestOneMessagePerDelivery:
    async def test_a_committed_item_reaches_slack_within_moments(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        async with running_queue() as queue:
            sub = subscriber(fakes)
            await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
            await webhook_connection(admin, org, fakes)
            item = await add_item(admin, org)
            started = time.monotonic()

            assert await outbox.announce(get_database(), queue, [item]) == 2, "one message per delivery"
            await until(lambda: len(fakes.slack.messages) == 1 and len(fakes.webhook.received("POST")) == 1)
            assert time.monotonic() - started < 2.0

            await until(lambda: _all(status(admin, org), "delivered"))
            rows = await deliveries(admin, org)
            assert [row["attempts"] for row in rows] == [1, 1]
            assert sorted(d for d, _ in sub.handled) == sorted(str(row["id"]) for row in rows)

    async def test_a_duplicate_message_sends_once(self, admin: Connection, org: dict[str, Any], fakes: Fakes) -> None:
        async with running_queue() as queue:
            sub = subscriber(fakes)
            await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
            item = await add_item(admin, org)
            [row] = await deliveries(admin, org)
            # The queue delivers at least once: two messages name the same delivery.
            assert await outbox.announce(get_database(), queue, [item]) == 1
            assert await publish(queue, DELIVERIES_TOPIC, {"delivery_id": str(row["id"])})

            await until(lambda: len(sub.handled) == 2)
            await until(lambda: _all(status(admin, org), "delivered"))
            await asyncio.sleep(0.2)
            assert len(fakes.slack.messages) == 1, "the second message found the delivery done"
            [row] = await deliveries(admin, org)
            assert row["attempts"] == 1

    async def test_a_message_that_names_nothing_is_dropped(self, fakes: Fakes) -> None:
        async with running_queue() as queue:
            sub = subscriber(fakes)
            assert await publish(queue, DELIVERIES_TOPIC, {"delivery_id": "not-a-uuid"})
            assert await publish(queue, DELIVERIES_TOPIC, {"delivery_id": str(uuid.uuid4())})
            await until(lambda: len(sub.handled) == 2)
            await asyncio.sleep(1.2)  # a retried message would be back by now
            assert len(sub.handled) == 2, "acknowledged, not retried"


class TestTheSweeperFindsLostMessages:
    async def test_a_crash_between_commit_and_send_is_delivered_by_the_cron(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        sub = subscriber(fakes)
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)  # committed; the process died before announcing it
        await asyncio.sleep(0.3)
        assert sub.handled == []
        assert fakes.slack.messages == []

        sweep = await run_deliveries(get_database(), env=fakes.env)
        assert sweep.claimed == 0, "within the grace a due delivery is its message's"
        await q(
            admin,
            "update public.deliveries set next_attempt_at = now() - interval '31 seconds' where org_id = %s",
            org["id"],
        )
        sweep = await run_deliveries(get_database(), env=fakes.env)
        assert (sweep.claimed, sweep.delivered) == (1, 1)
        assert len(fakes.slack.messages) == 1
        assert await status(admin, org) == ["delivered"]

    async def test_a_failed_send_after_commit_is_logged_and_left_to_the_sweeper(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes, log_lines: list[str]
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        item = await add_item(admin, org)
        # No queue configured at all: the SDK has neither a region nor a token here.
        assert await outbox.announce(get_database(), QueueEnvironment(), [item]) == 0
        assert any("queue-send-failed" in line for line in log_lines)
        assert await status(admin, org) == ["pending"]


class TestRetries:
    async def test_a_transient_failure_comes_back_after_the_recorded_backoff(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        async with running_queue() as queue:
            sub = subscriber(fakes, base_backoff_seconds=1.0, max_backoff_seconds=1.0)
            await webhook_connection(admin, org, fakes)
            fakes.webhook.scripted.append(Answer(503))  # the first attempt fails, the retry succeeds
            item = await add_item(admin, org)
            await outbox.announce(get_database(), queue, [item])

            await until(lambda: _all(status(admin, org), "failed"), 5)
            [failed] = await deliveries(admin, org)
            assert failed["attempts"] == 1
            assert failed["last_error"]
            first_at = time.monotonic()
            await until(lambda: _all(status(admin, org), "delivered"), 10)
            waited = time.monotonic() - first_at
            assert 0.5 <= waited < 3.0, f"the retry came after {waited:.2f} s, not the backoff (1 s)"
            # The same message came back (the queue's delay), not a second schedule.
            assert [count for _, count in sub.handled] == [1, 2]
            [row] = await deliveries(admin, org)
            assert row["attempts"] == 2

    async def test_a_poisoned_delivery_is_dead_after_max_attempts_with_the_reason(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        async with running_queue() as queue:
            sub = subscriber(fakes, base_backoff_seconds=1.0, max_backoff_seconds=1.0, max_attempts=3)
            await webhook_connection(admin, org, fakes, status=500)  # never gets better
            item = await add_item(admin, org)
            await outbox.announce(get_database(), queue, [item])

            await until(lambda: _all(status(admin, org), "dead"), 15)
            [row] = await deliveries(admin, org)
            assert row["attempts"] == 3
            assert row["last_error"].startswith("Gave up after 3 attempts.")
            assert len(fakes.webhook.received("POST")) == 3
            await asyncio.sleep(1.5)
            assert len(sub.handled) == 3, "a dead delivery's message is acknowledged, not retried"

    async def test_a_delivery_that_keeps_killing_its_sender_is_dead_after_max_attempts(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)
        [row] = await deliveries(admin, org)
        settings = WorkerSettings(max_attempts=2, lease_seconds=300)
        for _ in range(2):  # claimed, then the sender died before recording anything
            [job] = await delivery.claim(get_database(), limit=1, lease_seconds=300, max_attempts=2, only=row["id"])
            await q(
                admin,
                "update public.deliveries set lease_expires_at = now() - interval '1 second' where id = %s",
                row["id"],
            )
        assert job.attempts == 2
        assert await delivery.deliver_one(get_database(), row["id"], env=fakes.env, settings=settings) is None
        [row] = await deliveries(admin, org)
        assert row["status"] == "dead"
        assert row["last_error"] == (
            "Gave up after 2 attempts: each one stopped its sender before an outcome was recorded."
        )
        assert fakes.slack.messages == []

    async def test_a_message_for_a_delivery_held_by_a_live_lease_comes_back_when_it_expires(
        self, admin: Connection, org: dict[str, Any], fakes: Fakes
    ) -> None:
        await add_connection(admin, org, "slack_webhook", Credential(url=fakes.slack.webhook()), {})
        await add_item(admin, org)
        [row] = await deliveries(admin, org)
        await delivery.claim(get_database(), limit=1, lease_seconds=5, only=row["id"])  # another sender holds it
        come_back_in = await delivery.deliver_one(get_database(), row["id"], env=fakes.env)
        assert come_back_in is not None
        assert 4 <= come_back_in <= 6
        assert fakes.slack.messages == []


async def _all(rows: Any, wanted: str) -> bool:
    values = await rows
    return bool(values) and all(value == wanted for value in values)


def test_the_subscriber_functions_declare_their_topics_as_vercel_reads_them() -> None:
    """The build imports each module named in ``[[tool.vercel.subscribers]]`` and reads the SDK's
    registry (``get_subscriptions``) to give each function its queue triggers: do the same, in a fresh
    interpreter."""
    modules = subscriber_modules()
    script = (
        "import importlib, json, sys\n"
        "from vercel.queue import get_subscriptions\n"
        "for module in sys.argv[1:]: importlib.import_module(module)\n"
        "print(json.dumps(sorted([s.func.__module__, s.topic, s.consumer_group] for s in get_subscriptions())))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VERCEL": "1", "VERCEL_REGION": "iad1"}
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", script, *modules], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == [
        ["functions.queues.deliveries", DELIVERIES_TOPIC, DELIVERIES_CONSUMER],
        ["functions.queues.scan_steps", SCAN_STEPS_TOPIC, SCAN_STEPS_CONSUMER],
    ]
