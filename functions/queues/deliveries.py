"""Subscriber of the ``deliveries`` topic: claim exactly the delivery a message names and send it.

The database decides (claim, lease, fence, backoff, dead); the message only says "now". A transient
failure comes back after the recorded backoff through the queue's own delay. See
shared/connections/delivery.py and docs/connections.md.
"""

from shared.startup import modules_loaded

from vercel.queue import Message, subscribe

from shared.connections.delivery import on_message
from shared.db.session import get_database
from shared.queues import DELIVERIES_CONSUMER, DELIVERIES_TOPIC, come_back


@subscribe(topic=DELIVERIES_TOPIC, consumer_group=DELIVERIES_CONSUMER, retry_after=30)
async def send_delivery(message: Message[dict[str, object]]) -> None:
    come_back(await on_message(get_database(), message.payload))


modules_loaded()
