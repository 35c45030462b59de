"""Creating and reading scans (the dashboard's API), and claiming them (the worker's queue).

Creating walks three steps, in short transactions, no connection held during DNS:

1. *as the user* (RLS decides): the agent must be visible (else 404) and the caller an owner or
   admin of its organization (else 403); the plan's page cap is read on the way;
2. the egress guard's save-time check of the start URL (a refusal is a 422 naming the rule);
3. *as the service* (scans are written by the server only): find or create the agent's website
   source for that URL and queue the scan, one active scan per source (409 otherwise).

Claiming: ``FOR UPDATE SKIP LOCKED`` over queued scans and running scans whose lease has expired,
so any number of worker invocations share the queue; a claim takes a lease that every flush renews.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Final

from shared.auth import Claims
from shared.db.session import Database, as_service, as_user, jsonb, run_as_service
from shared.egress import check_url
from shared.errors import Conflict, Forbidden, NotFound, Unprocessable
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.queues import PRODUCTION as QUEUE
from shared.queues import SCAN_STEPS_TOPIC, QueueEnvironment, publish
from shared.ratelimit import RateLimitRule, enforce
from shared.scans.crawler import normalise
from shared.scans.schemas import ScanCreate, ScanEnvironment, ScanOut

_AGENT_FOR_USER: Final = """
select a.id, a.org_id,
       a.org_id = any (array(select private.user_admin_org_ids())) as can_manage,
       l.max_scan_pages
  from public.agents as a
  join public.organization_limits as l on l.org_id = a.org_id
 where a.id = %(agent_id)s
"""

# Serialises scan creation per agent, so two simultaneous requests cannot create two sources.
_LOCK_AGENT: Final = "select id from public.agents where id = %(agent_id)s and org_id = %(org_id)s for update"

_FIND_SOURCE: Final = """
select id from public.knowledge_sources
 where agent_id = %(agent_id)s and org_id = %(org_id)s and kind = 'website' and url = %(url)s
 order by created_at
 limit 1
"""

_INSERT_SOURCE: Final = """
insert into public.knowledge_sources (org_id, agent_id, kind, url)
values (%(org_id)s, %(agent_id)s, 'website', %(url)s)
returning id
"""

_ACTIVE_SCAN: Final = """
select id from public.scans where source_id = %(source_id)s and status in ('queued', 'running') limit 1
"""

_INSERT_SCAN: Final = """
insert into public.scans
  (org_id, agent_id, source_id, start_url, page_limit, max_depth, frontier, visited, pages_found, created_by)
values
  (%(org_id)s, %(agent_id)s, %(source_id)s, %(url)s, %(page_limit)s, %(max_depth)s, %(frontier)s, %(visited)s, 1,
   %(created_by)s)
returning *
"""

_SCAN_FOR_USER: Final = "select * from public.scans where id = %(id)s"

# ``only``/``step``: the one scan and step a queue message names (a step already taken is not claimed
# again). ``stale``: the sweeper's grace, so it leaves scans that still have a message to the queue;
# an expired lease (a dead worker) is taken at once either way.
_CLAIM: Final = """
with candidate as (
  select s.id
    from public.scans as s
   where (%(only)s::uuid is null or (s.id = %(only)s and s.step = %(step)s))
     and (
           (s.status = 'queued' and s.updated_at <= now() - make_interval(secs => %(stale)s))
        or (s.status = 'running' and s.lease_owner is null
            and s.updated_at <= now() - make_interval(secs => %(stale)s))
        or (s.status = 'running' and s.lease_owner is not null and s.lease_expires_at <= now())
     )
   order by s.created_at
   limit 1
   for update skip locked
)
update public.scans as s
   set status = 'running',
       started_at = coalesce(s.started_at, now()),
       lease_owner = %(owner)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
       -- A lease that expired while still owned was never released: its worker died.
       crash_count = s.crash_count + case when s.status = 'running' and s.lease_owner is not null then 1 else 0 end
  from candidate
 where s.id = candidate.id
returning s.*
"""


def worker_identity(env: ScanEnvironment) -> str:
    """A lease owner name unique to this invocation: host, process, random suffix."""
    prefix = env.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


def _log(message: str, *, org_id: uuid.UUID, request_id: str | None, reason: str, **fields: Any) -> None:
    log_event(message, logging.INFO, **{ORG_ID: str(org_id), REQUEST_ID: request_id, DECISION_REASON: reason}, **fields)


# A scan is the product's largest outbound activity: bound how many an organization can start.
SCAN_REQUESTS = RateLimitRule("scan-requests", limit=10, window_seconds=60)


async def create_scan(
    db: Database,
    claims: Claims,
    body: ScanCreate,
    *,
    env: ScanEnvironment,
    queue: QueueEnvironment = QUEUE,
    request_id: str | None,
) -> ScanOut:
    async with as_user(db, claims) as conn:
        agent = await (await conn.execute(_AGENT_FOR_USER, {"agent_id": body.agent_id})).fetchone()
    if agent is None:
        raise NotFound("No such agent.")
    if not agent["can_manage"]:
        raise Forbidden("Only owners and admins of the organization can scan sites for its agents.")
    org_id: uuid.UUID = agent["org_id"]
    await enforce(SCAN_REQUESTS, str(org_id), detail="Too many scans started for this organization; try again shortly.")

    await check_url(body.start_url, policy=env.policy, resolver=env.resolver)  # EgressDenied -> 422
    start_url = normalise(body.start_url)
    if start_url is None:
        raise Unprocessable("The start URL must be an http or https web address.")
    page_limit = min(body.page_limit or agent["max_scan_pages"], agent["max_scan_pages"])

    async with as_service(db) as conn:
        await conn.execute(_LOCK_AGENT, {"agent_id": body.agent_id, "org_id": org_id})
        params = {"agent_id": body.agent_id, "org_id": org_id, "url": start_url}
        source = await (await conn.execute(_FIND_SOURCE, params)).fetchone()
        if source is None:
            source = await (await conn.execute(_INSERT_SOURCE, params)).fetchone()
        assert source is not None  # noqa: S101 - insert ... returning always returns the row
        if await (await conn.execute(_ACTIVE_SCAN, {"source_id": source["id"]})).fetchone() is not None:
            raise Conflict("A scan of this site is already queued or running for this agent.")
        row = await (
            await conn.execute(
                _INSERT_SCAN,
                {
                    **params,
                    "source_id": source["id"],
                    "page_limit": page_limit,
                    "max_depth": body.max_depth,
                    "frontier": jsonb([[start_url, 0]]),
                    "visited": jsonb([start_url]),
                    "created_by": uuid.UUID(str(claims["sub"])),
                },
            )
        ).fetchone()
    assert row is not None  # noqa: S101 - insert ... returning always returns the row
    _log("scan queued", org_id=org_id, request_id=request_id, reason="scan-queued", scan_id=str(row["id"]))
    await announce_step(queue, row["id"], row["step"])
    return ScanOut.model_validate(dict(row))


async def get_scan(db: Database, claims: Claims, scan_id: uuid.UUID) -> ScanOut:
    """Members read their organization's scans through RLS; anything else is a 404."""
    async with as_user(db, claims) as conn:
        row = await (await conn.execute(_SCAN_FOR_USER, {"id": scan_id})).fetchone()
    if row is None:
        raise NotFound("No such scan.")
    return ScanOut.model_validate(dict(row))


async def claim_scan(
    db: Database,
    *,
    owner: str,
    lease_seconds: float,
    only: uuid.UUID | None = None,
    step: int = 0,
    stale_after_seconds: float = 0.0,
) -> dict[str, Any] | None:
    """Take the oldest scan that is queued or whose lease expired (or exactly ``only`` at ``step``);
    committed before any fetch."""
    params = {
        "owner": owner,
        "lease_seconds": lease_seconds,
        "only": only,
        "step": step,
        "stale": stale_after_seconds,
    }
    async with as_service(db) as conn:
        row = await (await conn.execute(_CLAIM, params)).fetchone()
    return dict(row) if row is not None else None


_WHY_NOT_CLAIMED: Final = """
select status, step, lease_owner is not null as leased,
       greatest(0, extract(epoch from coalesce(lease_expires_at, now()) - now()))::float8 as lease_in
  from public.scans
 where id = %(id)s
"""


async def step_come_back_in(db: Database, scan_id: uuid.UUID, step: int) -> float | None:
    """For a step message that claimed nothing: seconds until the step's lease expires when the step
    is held (its holder may have died), else ``None`` (taken already, finished, or no such scan)."""
    rows = await run_as_service(db, _WHY_NOT_CLAIMED, {"id": scan_id})
    if not rows:
        return None
    row = rows[0]
    if row["status"] != "running" or row["step"] != step or not row["leased"]:
        return None
    return max(1.0, float(row["lease_in"]))


async def announce_step(queue: QueueEnvironment, scan_id: uuid.UUID, step: int) -> bool:
    """After the scan's state committed: the message that asks for its next step."""
    return await publish(
        queue, SCAN_STEPS_TOPIC, {"scan_id": str(scan_id), "step": step}, idempotency_key=f"scan-{scan_id}-{step}"
    )
