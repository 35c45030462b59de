"""Background work on Vercel Queues: the database says what is to do, a queue message says "do it now".

Every piece of background work is a row first (a ``deliveries`` row, a ``scans`` row) and commits
before any message names it. A message carries only the row's id (and, for scan steps, the step it
asks for), so a lost, late or repeated message can never change what is done, only when: the
subscriber claims the row with the same fenced, leased ``FOR UPDATE SKIP LOCKED`` claim as the
cron, and a message whose row is not claimable is acknowledged and dropped. A send that fails
after the commit is logged and left to the cron, which stays as a sweeper of rows nobody has
touched for a while.

Sending goes through the ``vercel-queue`` SDK. On Vercel its client takes the region, the deployment
and an OIDC token from the platform; locally ``hiredhands dev`` points it at the SDK's queue dev
server, and tests pass a client of the SDK's embedded queue service (``QueueEnvironment``).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from shared.logs import DECISION_REASON, log_event

if TYPE_CHECKING:
    from vercel.queue import QueueClient

# Topics and the consumer group of the one subscriber function of each (functions/queues/; the build
# gives each function a queue trigger for the consumer group its @subscribe names).
DELIVERIES_TOPIC: Final = "deliveries"
DELIVERIES_CONSUMER: Final = "delivery-sender"
SCAN_STEPS_TOPIC: Final = "scan-steps"
SCAN_STEPS_CONSUMER: Final = "scan-stepper"


def platform_client() -> QueueClient:
    """The SDK's client with the platform's defaults. The SDK is imported here, on the first send:
    it costs a function about 70 ms to import, and most requests never send a message."""
    from vercel.queue import QueueClient

    return QueueClient()


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEnvironment:
    """Where messages go. Production uses ``PRODUCTION`` (the SDK's platform defaults); only code
    (tests, the benchmark, the local stack) builds another one."""

    client: Callable[[], QueueClient] = platform_client
    # A message whose row is still pending this long after it was due is the sweeper's (lost message).
    retention_seconds: int = 24 * 3600


PRODUCTION: Final = QueueEnvironment()


async def get_queue_environment() -> QueueEnvironment:
    """FastAPI dependency (tests override it in code, never through configuration); async, so it is
    not handed to a worker thread."""
    return PRODUCTION


def whole_seconds(delay: float) -> int:
    """The queue counts delays in whole seconds; rounding up never makes work due early."""
    return max(0, math.ceil(delay))


async def publish(
    queue: QueueEnvironment,
    topic: str,
    payload: Mapping[str, Any],
    *,
    idempotency_key: str | None = None,
    delay_seconds: float = 0.0,
) -> bool:
    """Send one message; ``False`` (and a log line) when it could not be sent. Never raises: the row is
    committed already, and the sweeper finds work whose message never arrived."""
    try:
        client = queue.client()
        await client.send(
            topic,
            dict(payload),
            idempotency_key=idempotency_key,
            delay=whole_seconds(delay_seconds) or None,
            retention=queue.retention_seconds,
        )
    except Exception as exc:  # the SDK's errors, the network, a missing platform configuration
        log_event(
            "queue message not sent; the sweeper will pick the work up",
            logging.WARNING,
            **{DECISION_REASON: "queue-send-failed"},
            topic=topic,
            error_type=type(exc).__name__,
        )
        return False
    return True


def come_back(seconds: float | None) -> None:
    """End a subscriber: ``None`` acknowledges the message; a number asks the queue to deliver it
    again after that many seconds (the SDK's ``RetryAfter``; the queue's delay, never a second one)."""
    if seconds is not None:
        from vercel.queue import RetryAfter  # a subscriber has imported the SDK already

        raise RetryAfter(max(1, whole_seconds(seconds)))


def message_id_field(payload: object, field: str, *, topic: str) -> uuid.UUID | None:
    """The row id a message names, or ``None`` (logged) for a message that names nothing usable:
    it is acknowledged and dropped, since no retry can make it name a row."""
    value = payload.get(field) if isinstance(payload, dict) else None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        log_event(
            "queue message names no row; dropped",
            logging.WARNING,
            **{DECISION_REASON: "queue-message-malformed"},
            topic=topic,
        )
        return None
