"""Monthly model budgets: an organization's limits and the reservations held against its cap.

The arithmetic lives in Postgres (``supabase/migrations/*_create_usage_and_budgets.sql``):
``private.reserve_budget`` locks the organization's limits row, so concurrent reservations of one
organization queue behind each other and can never together pass ``monthly_budget_microusd``; it
raises SQLSTATE HH402, which ``shared.db.errors`` turns into ``BudgetExhausted``. Settling and
releasing live with the usage row in ``shared.metering``, so the two commit together.

``reserve_within`` lets a call take what is left of the budget when a whole hold does not fit (the
gateway then lowers the call's completion allowance to what the hold pays for), and tells a call
refused only because other holds are in flight that waiting for them can help. Holds never add up
past the budget either way, so settled spend stays within it whatever the concurrency.

``load_limits`` takes the caller's connection, like every domain function. ``reserve`` and
``reserve_within`` take the ``Database`` instead: a reservation must be committed on its own before
the model is called, so that concurrent calls see it, and ``run_as_service`` does that in one round
trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from shared.db.session import Connection, Database, run_as_service


@dataclass(frozen=True, slots=True)
class OrgLimits:
    org_id: UUID
    plan: str
    monthly_budget_microusd: int
    burst_per_minute: int
    widget_rpm_per_agent: int
    widget_rpm_per_visitor: int
    max_scan_pages: int


_LIMITS = """
select org_id, plan, monthly_budget_microusd, burst_per_minute,
       widget_rpm_per_agent, widget_rpm_per_visitor, max_scan_pages
  from public.organization_limits
 where org_id = %(org_id)s
"""

_RESERVE = "select private.reserve_budget(%(org_id)s, %(amount)s) as id"
_RESERVE_WITHIN = (
    "select id, amount, waiting_helps from private.reserve_budget_within(%(org_id)s, %(amount)s, %(floor)s)"
)


@dataclass(frozen=True, slots=True)
class Reservation:
    id: UUID
    amount_microusd: int


async def load_limits(conn: Connection, org_id: UUID) -> OrgLimits | None:
    """The organization's limits; ``None`` for an unknown organization."""
    from psycopg.rows import class_row  # the driver loads with the first query, not at start

    async with conn.cursor(row_factory=class_row(OrgLimits)) as cur:
        await cur.execute(_LIMITS, {"org_id": org_id})
        return await cur.fetchone()


async def reserve(db: Database, *, org_id: UUID, amount_microusd: int) -> UUID:
    """Hold ``amount_microusd`` of this month's budget; raises ``BudgetExhausted`` past the cap.

    A reservation is at least one micro-dollar (the database refuses an empty hold), so even a
    free call (the offline provider) is admitted only while the budget has room.
    """
    rows = await run_as_service(db, _RESERVE, {"org_id": org_id, "amount": max(1, amount_microusd)})
    row = rows[0] if rows else None
    if row is None or row["id"] is None:  # pragma: no cover - the function always returns an id
        raise RuntimeError("reserve_budget returned no reservation")
    reservation_id: UUID = row["id"]
    return reservation_id


async def reserve_within(
    db: Database, *, org_id: UUID, amount_microusd: int, floor_microusd: int
) -> Reservation | None:
    """Hold ``amount_microusd``, or what is left of the budget when that is at least ``floor_microusd``.

    ``None``: there is no room now, but other calls' holds are in flight and the call would fit once
    they settle. Raises ``BudgetExhausted`` when it cannot fit even then. Amounts are at least one
    micro-dollar, as for ``reserve``.
    """
    amount = max(1, amount_microusd)
    floor = min(amount, max(1, floor_microusd))
    rows = await run_as_service(db, _RESERVE_WITHIN, {"org_id": org_id, "amount": amount, "floor": floor})
    if not rows:  # pragma: no cover - the function always returns a row or raises
        raise RuntimeError("reserve_budget_within returned nothing")
    row = rows[0]
    if row["id"] is None:
        return None
    return Reservation(row["id"], row["amount"])
