"""Vercel Queues subscriber of the ``deliveries`` topic: claim exactly the delivery a message names
and send it (vercel.json gives this function the topic's trigger; it has no public route).

The database decides (claim, lease, fence, backoff, dead); the message only says "now". A transient
failure comes back after the recorded backoff through the queue's own delay. See
shared/connections/delivery.py and docs/connections.md.
"""

from mangum import Mangum
from vercel.queue import Message, subscribe

from shared.connections.delivery import on_message
from shared.db.session import get_database
from shared.queues import DELIVERIES_CONSUMER, DELIVERIES_TOPIC, come_back
from shared.web import queue_push
from shared.web.app import create_app


@subscribe(topic=DELIVERIES_TOPIC, consumer_group=DELIVERIES_CONSUMER, retry_after=30)
async def send_delivery(message: Message[dict[str, object]]) -> None:
    come_back(await on_message(get_database(), message.payload))


# The body is a message naming one of our rows, not user input that could carry card data.
app = create_app("queue_deliveries", [queue_push.router], scan_for_card_data=False)
lambda_handler = Mangum(app, lifespan="off")
