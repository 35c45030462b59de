"""The delivery outbox worker: claim, send, record. Any number of workers cooperate.

A delivery row moves ``pending -> in_progress -> delivered``; a transient failure makes it
``failed`` with a later ``next_attempt_at`` (exponential backoff with a cap, then ``dead`` after
`WorkerSettings.max_attempts`); a request the provider refuses for good makes it ``dead``; a
credential the provider refuses (401/403/404/410, or a destination the egress guard refuses) breaks
the connection (status, reason, time, an audit row), and its deliveries wait, unclaimed, until a
re-verification brings it back.

Crash safety. Claiming commits before anything is sent: the row becomes ``in_progress`` with a
lease (``lease_expires_at``) and ``attempts + 1``. A worker that dies mid-send leaves that row to be
claimed again once the lease expires, so nothing is lost. Every write after the send is fenced on
``(status = 'in_progress', attempts = <our claim>)``, so a worker that outlived its lease cannot
overwrite the newer claim. And nothing is created twice where the provider creates something:
a re-claimed GitHub or Notion delivery first looks for what an earlier attempt made (an
idempotency marker in the issue body / a reference in the page title) and records that instead;
a custom webhook gets the same ``webhook-id`` on every attempt, which Standard Webhooks receivers
dedupe on. Slack and Discord webhooks have no way to ask "did this arrive?": a crash between their
send and our record can repeat that one chat message (at-least-once, as every webhook sender).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Final

from shared.connections import providers
from shared.connections.errors import CredentialRejected, ProviderUnavailable, RequestRejected
from shared.connections.providers import PRODUCTION, HttpClient, ProviderEnvironment
from shared.connections.schemas import DeliveryJob, ReviewItem
from shared.connections.service import open_credential, write_audit
from shared.crypto import CredentialUnreadable, Sealed
from shared.db.session import Database, as_service, run_as_service
from shared.logs import DECISION_REASON, ORG_ID, log_event
from shared.queues import DELIVERIES_TOPIC, message_id_field, whole_seconds

ACTOR_WORKER: Final = "delivery-worker"
MAX_ATTEMPTS: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    batch_size: int = 20
    concurrency: int = 10  # sends in flight per worker
    lease_seconds: float = 120.0  # > the longest send (3 provider calls within the policy's timeouts)
    max_attempts: int = MAX_ATTEMPTS
    base_backoff_seconds: float = 30.0
    max_backoff_seconds: float = 3600.0
    # Stop claiming after this; the cron runs again next minute. Below Vercel's default function
    # duration, so the last batch usually finishes too (if not, its leases bring the rows back).
    time_budget_seconds: float = 8.0
    # The cron sweeps: it takes only rows due for this long, whose queue message was lost or never
    # sent; fresher ones belong to their message. Expired leases are taken at once either way.
    stale_after_seconds: float = 30.0


@dataclass(slots=True)
class RunReport:
    claimed: int = 0
    delivered: int = 0
    found_existing: int = 0
    retried: int = 0
    dead: int = 0
    broken_connections: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "delivered": self.delivered,
            "found_existing": self.found_existing,
            "retried": self.retried,
            "dead": self.dead,
            "broken_connections": self.broken_connections,
        }


# A delivery whose leases keep expiring kills whatever sends it (a poisoned row): once it has been
# claimed max_attempts times it is dead, with the reason, instead of being claimed forever.
_GIVE_UP_CRASHED = """
update public.deliveries
   set status = 'dead', lease_expires_at = null,
       last_error = 'Gave up after ' || attempts
                    || ' attempts: each one stopped its sender before an outcome was recorded.'
 where status = 'in_progress' and lease_expires_at <= now() and attempts >= %(max_attempts)s
   and (%(only)s::uuid is null or id = %(only)s)
returning id, org_id, attempts
"""

# Claims due rows of active connections, oldest first, skipping rows other workers hold, and
# returns each with what sending needs. One statement, committed before any send. ``only``: the one
# row a queue message names; ``stale``: the sweeper's grace for rows that still have a message.
_CLAIM = """
with candidates as (
  select d.id
    from public.deliveries as d
    join public.connections as c on c.id = d.connection_id
   where c.status = 'active'
     and (%(only)s::uuid is null or d.id = %(only)s)
     and (
           (d.status in ('pending', 'failed') and d.next_attempt_at <= now() - make_interval(secs => %(stale)s))
        or (d.status = 'in_progress' and d.lease_expires_at <= now())
     )
   order by d.next_attempt_at
   limit %(limit)s
   for update of d skip locked
),
claimed as (
  update public.deliveries as d
     set status = 'in_progress',
         attempts = d.attempts + 1,
         lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
    from candidates
   where d.id = candidates.id
  returning d.*
)
select claimed.id, claimed.org_id, claimed.connection_id, claimed.attempts, claimed.idempotency_key,
       claimed.created_at, c.kind, c.target, k.key_id, k.nonce, k.ciphertext,
       r.id as item_id, r.kind as item_kind, r.title as item_title, r.payload as item_payload,
       r.created_at as item_created_at
  from claimed
  join public.connections as c on c.id = claimed.connection_id
  join public.review_items as r on r.id = claimed.review_item_id
  left join secrets.connection_credentials as k on k.connection_id = claimed.connection_id
"""

# Fenced: only the claim that is still current may record its outcome.
_FENCE = "where id = %(id)s and status = 'in_progress' and attempts = %(attempts)s"

_DELIVERED = f"""
update public.deliveries
   set status = 'delivered', delivered_at = now(), external_ref = %(external_ref)s,
       lease_expires_at = null, last_error = null
 {_FENCE}
"""  # noqa: S608 - _FENCE is a constant

_RETRY = f"""
update public.deliveries
   set status = 'failed', next_attempt_at = now() + make_interval(secs => %(delay)s),
       lease_expires_at = null, last_error = %(error)s
 {_FENCE}
"""  # noqa: S608 - _FENCE is a constant

_DEAD = f"""
update public.deliveries
   set status = 'dead', lease_expires_at = null, last_error = %(error)s
 {_FENCE}
"""  # noqa: S608 - _FENCE is a constant

# The connection stops being claimed; this delivery waits with it, its reason recorded.
_PARK = f"""
update public.deliveries
   set status = 'failed', next_attempt_at = now(), lease_expires_at = null, last_error = %(error)s
 {_FENCE}
"""  # noqa: S608 - _FENCE is a constant

_BREAK_CONNECTION = """
update public.connections
   set status = 'broken', status_reason = %(reason)s, broken_at = now()
 where id = %(id)s and status = 'active'
returning id
"""


def backoff_seconds(attempts: int, job_key: uuid.UUID, settings: WorkerSettings, retry_after: float | None) -> float:
    """Exponential from the base, capped, with a per-delivery jitter in [0.5, 1.0) of the step so
    that a burst of failures does not retry in lockstep; never sooner than the provider asked."""
    step = min(settings.max_backoff_seconds, settings.base_backoff_seconds * 2.0 ** max(0, attempts - 1))
    jitter = 0.5 + (job_key.int % 1000) / 2000
    return max(step * jitter, min(retry_after or 0.0, settings.max_backoff_seconds))


def _job(row: dict[str, Any]) -> DeliveryJob:
    return DeliveryJob(
        id=row["id"],
        org_id=row["org_id"],
        connection_id=row["connection_id"],
        attempts=row["attempts"],
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
        kind=row["kind"],
        target=row["target"],
        key_id=row["key_id"],
        nonce=bytes(row["nonce"]) if row["nonce"] is not None else None,
        ciphertext=bytes(row["ciphertext"]) if row["ciphertext"] is not None else None,
        item=ReviewItem(
            id=row["item_id"],
            org_id=row["org_id"],
            kind=row["item_kind"],
            title=row["item_title"],
            payload=row["item_payload"] if isinstance(row["item_payload"], dict) else {},
            created_at=row["item_created_at"],
        ),
    )


async def claim(
    db: Database,
    *,
    limit: int,
    lease_seconds: float,
    max_attempts: int = MAX_ATTEMPTS,
    only: uuid.UUID | None = None,
    stale_after_seconds: float = 0.0,
) -> list[DeliveryJob]:
    params = {
        "limit": limit,
        "lease_seconds": lease_seconds,
        "max_attempts": max_attempts,
        "only": only,
        "stale": stale_after_seconds,
    }
    async with as_service(db) as conn:
        given_up = await (await conn.execute(_GIVE_UP_CRASHED, params)).fetchall()
        rows = await (await conn.execute(_CLAIM, params)).fetchall()
    for row in given_up:
        log_event(
            "delivery dead",
            logging.WARNING,
            **{ORG_ID: str(row["org_id"]), DECISION_REASON: "sender-crashed"},
            delivery_id=str(row["id"]),
            attempts=row["attempts"],
        )
    return [_job(dict(row)) for row in rows]


class Worker:
    """One worker invocation: a guarded client shared by its sends, and the database."""

    def __init__(
        self, db: Database, *, env: ProviderEnvironment = PRODUCTION, settings: WorkerSettings | None = None
    ) -> None:
        self.db = db
        self.env = env
        self.settings = settings or WorkerSettings()
        self.report = RunReport()

    async def run(self) -> RunReport:
        settings = self.settings
        deadline = time.monotonic() + settings.time_budget_seconds
        semaphore = asyncio.Semaphore(settings.concurrency)
        async with self.env.client() as client:

            async def bounded(job: DeliveryJob) -> None:
                async with semaphore:
                    await self.process(job, client)

            while time.monotonic() < deadline:
                jobs = await claim(
                    self.db,
                    limit=settings.batch_size,
                    lease_seconds=settings.lease_seconds,
                    max_attempts=settings.max_attempts,
                    stale_after_seconds=settings.stale_after_seconds,
                )
                if not jobs:
                    break
                self.report.claimed += len(jobs)
                await asyncio.gather(*(bounded(job) for job in jobs))
        return self.report

    async def process(self, job: DeliveryJob, client: HttpClient) -> float | None:
        """Send one claimed delivery and record the outcome. Never raises for a provider's answer.
        Returns the backoff in seconds when the delivery is to be tried again, else ``None``."""
        try:
            if job.key_id is None or job.nonce is None or job.ciphertext is None:
                raise CredentialUnreadable("the connection has no stored credential")
            credential = open_credential(
                Sealed(key_id=job.key_id, nonce=job.nonce, ciphertext=job.ciphertext),
                org_id=job.org_id,
                connection_id=job.connection_id,
            )
            sent = await providers.send(job, credential, client=client, env=self.env)
        except CredentialRejected as exc:
            await self._break(job, exc)
        except RequestRejected as exc:
            await self._finish(_DEAD, job, error=exc.message)
            self.report.dead += 1
            self._log("delivery dead", job, "provider-refused", http_status=exc.status)
        except ProviderUnavailable as exc:
            return await self._retry(job, exc.message, exc.retry_after)
        except CredentialUnreadable:
            # A configuration problem on our side (a key id no longer configured): keep retrying,
            # loudly, rather than lose the delivery.
            self._log("delivery credential unreadable", job, "credential-unreadable", level=logging.ERROR)
            return await self._retry(job, "The stored credential cannot be read; we are on it.", None)
        except Exception as exc:  # a bug must not lose the row: it retries like a transient failure
            self._log("delivery error", job, "internal-error", level=logging.ERROR, error_type=type(exc).__name__)
            return await self._retry(job, "An internal error interrupted this delivery; it will be retried.", None)
        else:
            await self._finish(_DELIVERED, job, external_ref=sent.external_ref)
            self.report.delivered += 1
            self.report.found_existing += int(sent.found_existing)
        return None

    async def _finish(self, sql: str, job: DeliveryJob, **values: Any) -> bool:
        async with as_service(self.db) as conn:
            cursor = await conn.execute(sql, {"id": job.id, "attempts": job.attempts, **values})
        return cursor.rowcount == 1  # known once the pipelined transaction has synced

    async def _retry(self, job: DeliveryJob, message: str, retry_after: float | None) -> float | None:
        if job.attempts >= self.settings.max_attempts:
            await self._finish(_DEAD, job, error=f"Gave up after {job.attempts} attempts. Last error: {message}")
            self.report.dead += 1
            self._log("delivery dead", job, "attempts-exhausted")
            return None
        # Whole seconds: the queue's delay counts in seconds, and the row must be due when it fires.
        delay = float(whole_seconds(backoff_seconds(job.attempts, job.idempotency_key, self.settings, retry_after)))
        recorded = await self._finish(_RETRY, job, delay=delay, error=message)
        self.report.retried += 1
        self._log("delivery retry", job, "provider-unavailable", delay_seconds=delay)
        return delay if recorded else None

    async def _break(self, job: DeliveryJob, exc: CredentialRejected) -> None:
        async with as_service(self.db) as conn:
            await conn.execute(_PARK, {"id": job.id, "attempts": job.attempts, "error": exc.message})
            broke = await (
                await conn.execute(_BREAK_CONNECTION, {"id": job.connection_id, "reason": exc.message})
            ).fetchone()
            if broke is not None:
                await write_audit(
                    conn,
                    org_id=job.org_id,
                    action="connection.broken",
                    connection_id=job.connection_id,
                    actor=ACTOR_WORKER,
                    actor_user_id=None,
                    details={"reason": exc.message, "http_status": exc.status, "delivery_id": str(job.id)},
                    request_id=None,
                )
        if broke is not None:
            self.report.broken_connections += 1
            self._log("connection broken", job, "credential-rejected", http_status=exc.status)

    @staticmethod
    def _log(message: str, job: DeliveryJob, reason: str, *, level: int = logging.INFO, **fields: Any) -> None:
        log_event(
            message,
            level,
            **{ORG_ID: str(job.org_id), DECISION_REASON: reason},
            delivery_id=str(job.id),
            connection_id=str(job.connection_id),
            connection_kind=job.kind,
            attempts=job.attempts,
            **fields,
        )


async def run_deliveries(
    db: Database, *, env: ProviderEnvironment = PRODUCTION, settings: WorkerSettings | None = None
) -> RunReport:
    """One worker run (the cron entry point): claim and send until the outbox is empty or time is up."""
    return await Worker(db, env=env, settings=settings).run()


# -- the queue's way in: one message per delivery ---------------------------------------------------

_WHY_NOT_CLAIMED = """
select d.status, c.status as connection_status,
       greatest(0, extract(epoch from d.next_attempt_at - now()))::float8 as due_in,
       greatest(0, extract(epoch from coalesce(d.lease_expires_at, now()) - now()))::float8 as lease_in
  from public.deliveries as d
  join public.connections as c on c.id = d.connection_id
 where d.id = %(id)s
"""


async def deliver_one(
    db: Database,
    delivery_id: uuid.UUID,
    *,
    env: ProviderEnvironment = PRODUCTION,
    settings: WorkerSettings | None = None,
) -> float | None:
    """Claim exactly this delivery and send it (a queue message's work).

    Returns the seconds after which the message should come back: the backoff after a transient
    failure (the only retry schedule: the queue's delay carries it, the row's ``next_attempt_at``
    records it), a row not due yet, or a row held by a live lease (its holder may have died; the
    message comes back when the lease has expired). ``None``: nothing more for this message to do
    (delivered, dead, parked on a broken connection, or no such row), so it is acknowledged.
    """
    settings = settings or WorkerSettings()
    jobs = await claim(
        db, limit=1, lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts, only=delivery_id
    )
    if not jobs:
        return await _come_back_in(db, delivery_id)
    return await Worker(db, env=env, settings=settings).process(jobs[0], _loop_client(env))


# One guarded client per event loop and environment for the queue's sends: building one costs more
# than a send (its TLS context), and messages arrive one at a time. Every connection it opens is
# still vetted by the egress guard at connect time.
# Keyed by the environment's identity (it may hold an unhashable resolver), kept with it alive.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, tuple[ProviderEnvironment, HttpClient]]] = (
    weakref.WeakKeyDictionary()
)


def _loop_client(env: ProviderEnvironment) -> HttpClient:
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    held = clients.get(id(env))
    if held is None or held[1].is_closed:
        held = clients[id(env)] = (env, env.client())
    return held[1]


async def close_clients() -> None:
    """Close the running loop's clients (end of a process, a benchmark, a test)."""
    for _, client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose()


async def _come_back_in(db: Database, delivery_id: uuid.UUID) -> float | None:
    rows = await run_as_service(db, _WHY_NOT_CLAIMED, {"id": delivery_id})
    if not rows or rows[0]["connection_status"] != "active":
        return None  # gone, or parked until a re-verification (then the sweeper sends it)
    row = rows[0]
    if row["status"] in ("pending", "failed"):
        return float(whole_seconds(row["due_in"])) or 1.0
    if row["status"] == "in_progress":
        return float(whole_seconds(row["lease_in"])) or 1.0
    return None  # delivered or dead


async def on_message(
    db: Database,
    payload: object,
    *,
    env: ProviderEnvironment = PRODUCTION,
    settings: WorkerSettings | None = None,
) -> float | None:
    """A ``deliveries`` message (``{"delivery_id": …}``): what ``deliver_one`` does, for the id it names."""
    delivery_id = message_id_field(payload, "delivery_id", topic=DELIVERIES_TOPIC)
    if delivery_id is None:
        return None
    return await deliver_one(db, delivery_id, env=env, settings=settings)
