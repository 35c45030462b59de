"""Subscriber of the ``scan-steps`` topic: one step of one scan per message (claim the lease, fetch
for a few seconds, flush, release, send the next step's message). Many scans advance in parallel
invocations; politeness is per host across all of them. See shared/scans/worker.py and docs/scans.md.
"""

from shared.startup import modules_loaded

from vercel.queue import Message, subscribe

from shared.db.session import get_database
from shared.queues import SCAN_STEPS_CONSUMER, SCAN_STEPS_TOPIC, come_back
from shared.scans.worker import on_message


@subscribe(topic=SCAN_STEPS_TOPIC, consumer_group=SCAN_STEPS_CONSUMER, retry_after=30)
async def take_scan_step(message: Message[dict[str, object]]) -> None:
    come_back(await on_message(get_database(), message.payload))


modules_loaded()
