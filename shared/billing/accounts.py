"""SQL for billing state: the organization's billing account, its limits, the event ledger, the
audit row. Functions take an open connection (``as_service`` or ``as_user``) and never commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from shared.billing.plans import Plan
from shared.billing.schemas import LedgerIds
from shared.db.session import Connection, jsonb

ACTOR_WEBHOOK: Final = "stripe-webhook"

_MEMBER_ROLE = """
select m.role
  from public.memberships as m
 where m.org_id = %(org_id)s
   and m.user_id = (select auth.uid())
"""

_ORGANIZATION = "select o.id, o.name from public.organizations as o where o.id = %(org_id)s"

_ACCOUNT = """
select a.org_id, a.stripe_customer_id, a.stripe_subscription_id, a.subscription_status, a.plan,
       a.current_period_end, a.state_updated_at, a.checkout_attempt, a.checkout_plan, a.checkout_expires_at,
       a.checkout_claimed_at, a.checkout_session_id, a.checkout_url, now() as now
  from public.billing_accounts as a
 where a.org_id = %(org_id)s
"""

_ORG_BY_CUSTOMER = "select a.org_id from public.billing_accounts as a where a.stripe_customer_id = %(customer_id)s"

_ENSURE_ACCOUNT = "insert into public.billing_accounts (org_id) values (%(org_id)s) on conflict (org_id) do nothing"

# Keeps the first customer ever stored: a racing second checkout cannot replace it. The account
# row exists first (_ENSURE_ACCOUNT), so racing starts serialize on its row lock; an insert carrying
# the customer id could instead hit the unique index on stripe_customer_id (23505) while the other
# insert is still uncommitted.
_LINK_CUSTOMER = """
update public.billing_accounts
   set stripe_customer_id = coalesce(stripe_customer_id, %(customer_id)s)
 where org_id = %(org_id)s
returning stripe_customer_id
"""

# The watermark is checked here as well as by the caller: an older observation never lands.
_SET_SUBSCRIPTION_STATE = """
update public.billing_accounts
   set stripe_customer_id = coalesce(stripe_customer_id, %(customer_id)s),
       stripe_subscription_id = %(subscription_id)s,
       subscription_status = %(status)s,
       plan = %(plan)s,
       current_period_end = %(current_period_end)s,
       state_updated_at = %(observed_at)s
 where org_id = %(org_id)s
   and (state_updated_at is null or state_updated_at < %(observed_at)s)
returning org_id
"""

_LIMITS_PLAN_FOR_UPDATE = "select l.plan from public.organization_limits as l where l.org_id = %(org_id)s for update"

_SET_LIMITS = """
insert into public.organization_limits
  (org_id, plan, monthly_budget_microusd, burst_per_minute, widget_rpm_per_agent, widget_rpm_per_visitor,
   max_scan_pages)
values
  (%(org_id)s, %(plan)s, %(monthly_budget_microusd)s, %(burst_per_minute)s, %(widget_rpm_per_agent)s,
   %(widget_rpm_per_visitor)s, %(max_scan_pages)s)
on conflict (org_id) do update
   set plan = excluded.plan,
       monthly_budget_microusd = excluded.monthly_budget_microusd,
       burst_per_minute = excluded.burst_per_minute,
       widget_rpm_per_agent = excluded.widget_rpm_per_agent,
       widget_rpm_per_visitor = excluded.widget_rpm_per_visitor,
       max_scan_pages = excluded.max_scan_pages
"""

_INSERT_AUDIT = """
insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details, request_id)
values (%(org_id)s, null, %(actor)s, %(action)s, %(target_type)s, %(target_id)s, %(details)s, %(request_id)s)
"""

_CLAIM_CHECKOUT = """
update public.billing_accounts
   set checkout_attempt = %(attempt)s,
       checkout_plan = %(plan)s,
       checkout_expires_at = %(expires_at)s,
       checkout_claimed_at = now(),
       checkout_session_id = null,
       checkout_url = null
 where org_id = %(org_id)s
"""

# Only the attempt that was claimed stores its session; a takeover of the same attempt stores the
# same session (same idempotency key), so coalesce keeps whichever landed first.
_STORE_CHECKOUT = """
update public.billing_accounts
   set checkout_session_id = coalesce(checkout_session_id, %(session_id)s),
       checkout_url = case when checkout_session_id is null then %(url)s else checkout_url end
 where org_id = %(org_id)s
   and checkout_attempt = %(attempt)s
   and checkout_plan is not null
returning checkout_url
"""

_RELEASE_CHECKOUT = """
update public.billing_accounts
   set checkout_plan = null, checkout_expires_at = null, checkout_claimed_at = null
 where org_id = %(org_id)s
   and checkout_attempt = %(attempt)s
   and checkout_session_id is null
"""

_FORGET_CHECKOUT = """
update public.billing_accounts
   set checkout_plan = null, checkout_expires_at = null, checkout_claimed_at = null,
       checkout_session_id = null, checkout_url = null
 where org_id = %(org_id)s
   and checkout_session_id = %(session_id)s
"""

_CHECKOUT_STATE = """
select a.checkout_attempt, a.checkout_plan, a.checkout_url
  from public.billing_accounts as a
 where a.org_id = %(org_id)s
"""

_EVENT_RECORDED = "select 1 from public.stripe_events as e where e.id = %(id)s"

_RECORD_EVENT = """
insert into public.stripe_events
  (id, type, org_id, event_created, object_type, object_id, customer_id, subscription_id)
values
  (%(id)s, %(type)s, %(org_id)s, %(event_created)s, %(object_type)s, %(object_id)s, %(customer_id)s,
   %(subscription_id)s)
on conflict (id) do nothing
returning id
"""

_FINISH_EVENT = "update public.stripe_events set outcome = %(outcome)s, processed_at = now() where id = %(id)s"


async def member_role(conn: Connection, org_id: uuid.UUID) -> str | None:
    """The caller's role in the organization, as RLS lets them see it (run ``as_user``)."""
    row = await (await conn.execute(_MEMBER_ROLE, {"org_id": org_id})).fetchone()
    return str(row["role"]) if row else None


async def organization(conn: Connection, org_id: uuid.UUID) -> dict[str, Any] | None:
    row = await (await conn.execute(_ORGANIZATION, {"org_id": org_id})).fetchone()
    return dict(row) if row else None


async def account(conn: Connection, org_id: uuid.UUID, *, for_update: bool = False) -> dict[str, Any] | None:
    query = _ACCOUNT + (" for update" if for_update else "")
    row = await (await conn.execute(query, {"org_id": org_id})).fetchone()
    return dict(row) if row else None


async def ensure_account(conn: Connection, org_id: uuid.UUID) -> None:
    await conn.execute(_ENSURE_ACCOUNT, {"org_id": org_id})


async def org_by_customer(conn: Connection, customer_id: str) -> uuid.UUID | None:
    row = await (await conn.execute(_ORG_BY_CUSTOMER, {"customer_id": customer_id})).fetchone()
    return row["org_id"] if row else None


async def link_customer(conn: Connection, org_id: uuid.UUID, customer_id: str) -> str:
    """Store the organization's Stripe customer unless one is stored already; returns the stored one."""
    await ensure_account(conn, org_id)
    row = await (await conn.execute(_LINK_CUSTOMER, {"org_id": org_id, "customer_id": customer_id})).fetchone()
    if row is None:  # the row was just ensured
        raise RuntimeError("billing account upsert returned nothing")
    return str(row["stripe_customer_id"])


async def set_subscription_state(
    conn: Connection,
    org_id: uuid.UUID,
    *,
    customer_id: str,
    subscription_id: str,
    status: str,
    plan: str,
    current_period_end: datetime | None,
    observed_at: datetime,
) -> bool:
    row = await (
        await conn.execute(
            _SET_SUBSCRIPTION_STATE,
            {
                "org_id": org_id,
                "customer_id": customer_id,
                "subscription_id": subscription_id,
                "status": status,
                "plan": plan,
                "current_period_end": current_period_end,
                "observed_at": observed_at,
            },
        )
    ).fetchone()
    return row is not None


async def limits_plan_for_update(conn: Connection, org_id: uuid.UUID) -> str | None:
    row = await (await conn.execute(_LIMITS_PLAN_FOR_UPDATE, {"org_id": org_id})).fetchone()
    return str(row["plan"]) if row else None


async def set_limits(conn: Connection, org_id: uuid.UUID, plan: Plan) -> None:
    await conn.execute(
        _SET_LIMITS,
        {
            "org_id": org_id,
            "plan": plan.name,
            "monthly_budget_microusd": plan.monthly_budget_microusd,
            "burst_per_minute": plan.burst_per_minute,
            "widget_rpm_per_agent": plan.widget_rpm_per_agent,
            "widget_rpm_per_visitor": plan.widget_rpm_per_visitor,
            "max_scan_pages": plan.max_scan_pages,
        },
    )


async def write_audit(
    conn: Connection,
    org_id: uuid.UUID,
    *,
    action: str,
    target_type: str,
    target_id: str,
    details: Mapping[str, Any],
    request_id: str | None,
    actor: str = ACTOR_WEBHOOK,
) -> None:
    await conn.execute(
        _INSERT_AUDIT,
        {
            "org_id": org_id,
            "actor": actor,
            "action": action,
            "target_type": target_type,
            "target_id": target_id,
            "details": jsonb(dict(details)),
            "request_id": request_id,
        },
    )


async def claim_checkout(conn: Connection, org_id: uuid.UUID, *, attempt: int, plan: str, expires_at: datetime) -> None:
    """Make ``attempt`` the organization's current checkout, its session not created yet (run under
    the account's row lock)."""
    await conn.execute(_CLAIM_CHECKOUT, {"org_id": org_id, "attempt": attempt, "plan": plan, "expires_at": expires_at})


async def store_checkout(conn: Connection, org_id: uuid.UUID, *, attempt: int, session_id: str, url: str) -> str | None:
    """Record the attempt's session; returns the URL stored for it, or None when the attempt is no
    longer the current one."""
    row = await (
        await conn.execute(
            _STORE_CHECKOUT, {"org_id": org_id, "attempt": attempt, "session_id": session_id, "url": url}
        )
    ).fetchone()
    return str(row["checkout_url"]) if row else None


async def release_checkout(conn: Connection, org_id: uuid.UUID, *, attempt: int) -> None:
    """Give up a claimed attempt whose session could not be created; the next start claims a new one."""
    await conn.execute(_RELEASE_CHECKOUT, {"org_id": org_id, "attempt": attempt})


async def forget_checkout(conn: Connection, org_id: uuid.UUID, session_id: str) -> None:
    """The session is no longer open (expired by us, completed, or gone at Stripe)."""
    await conn.execute(_FORGET_CHECKOUT, {"org_id": org_id, "session_id": session_id})


async def checkout_state(conn: Connection, org_id: uuid.UUID) -> dict[str, Any] | None:
    row = await (await conn.execute(_CHECKOUT_STATE, {"org_id": org_id})).fetchone()
    return dict(row) if row else None


async def event_recorded(conn: Connection, event_id: str) -> bool:
    return await (await conn.execute(_EVENT_RECORDED, {"id": event_id})).fetchone() is not None


async def record_event(
    conn: Connection,
    *,
    event_id: str,
    event_type: str,
    org_id: uuid.UUID | None,
    event_created: datetime,
    ids: LedgerIds,
) -> bool:
    """Insert the event into the ledger; False when its id is there already (a duplicate delivery).
    The row keeps the event's id, type, created and the ids of its object, never its payload."""
    row = await (
        await conn.execute(
            _RECORD_EVENT,
            {
                "id": event_id,
                "type": event_type,
                "org_id": org_id,
                "event_created": event_created,
                "object_type": ids.object_type,
                "object_id": ids.object_id,
                "customer_id": ids.customer_id,
                "subscription_id": ids.subscription_id,
            },
        )
    ).fetchone()
    return row is not None


async def finish_event(conn: Connection, event_id: str, outcome: str) -> None:
    await conn.execute(_FINISH_EVENT, {"id": event_id, "outcome": outcome})
