"""The delivery outbox's announcements: after review items commit, one queue message per delivery.

The schema queues the deliveries (a trigger on review items, one row per active connection that
asked for the item's kind); this module only tells the queue about them, after the commit. Kept
apart from the worker so that the widget, which announces, does not load the providers.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Final

from shared.db.session import Database, run_as_service
from shared.queues import DELIVERIES_TOPIC, QueueEnvironment, publish

_PENDING_OF_ITEMS: Final = """
select id from public.deliveries where review_item_id = any(%(item_ids)s) and status = 'pending' order by created_at
"""


async def announce(db: Database, queue: QueueEnvironment, item_ids: Sequence[uuid.UUID]) -> int:
    """One message per pending delivery of ``item_ids`` (committed already). Returns how many were
    sent; the others are the sweeper's."""
    if not item_ids:
        return 0
    rows = await run_as_service(db, _PENDING_OF_ITEMS, {"item_ids": list(item_ids)})
    sent = await asyncio.gather(
        *(
            publish(queue, DELIVERIES_TOPIC, {"delivery_id": str(row["id"])}, idempotency_key=f"delivery-{row['id']}")
            for row in rows
        )
    )
    return sum(sent)
