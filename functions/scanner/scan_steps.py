"""Vercel Queues subscriber of the ``scan-steps`` topic: one step of one scan per message (claim the
lease, fetch for a few seconds, flush, release, send the next step's message). Many scans advance in
parallel invocations; politeness is per host across all of them. vercel.json gives this function
the topic's trigger (it has no public route); it ships with the scanner's extraction stack. See
shared/scans/worker.py and docs/scans.md.
"""

from mangum import Mangum
from vercel.queue import Message, subscribe

from shared.db.session import get_database
from shared.queues import SCAN_STEPS_CONSUMER, SCAN_STEPS_TOPIC, come_back
from shared.scans.worker import on_message
from shared.web import queue_push
from shared.web.app import create_app


@subscribe(topic=SCAN_STEPS_TOPIC, consumer_group=SCAN_STEPS_CONSUMER, retry_after=30)
async def take_scan_step(message: Message[dict[str, object]]) -> None:
    come_back(await on_message(get_database(), message.payload))


# The body is a message naming one of our rows, not user input that could carry card data.
app = create_app("scan_steps", [queue_push.router], scan_for_card_data=False)
lambda_handler = Mangum(app, lifespan="off")
