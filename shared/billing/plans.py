"""The plans and what each one sets in ``organization_limits``.

A plan is defined here, in code, and named in Stripe by a price **lookup key**, not by a price id:
lookup keys are the same in test and live mode, survive a price change (a new price takes the key
over with ``transfer_lookup_key``), and need no per-environment configuration. Checkout resolves the
key to the current price through the API; the webhook reads the key off the subscription's price.

``free`` must equal the column defaults of ``public.organization_limits`` (a test checks it): a new
organization starts on it, and every subscription that stops entitling returns to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

PlanName = Literal["free", "starter", "pro"]
PaidPlanName = Literal["starter", "pro"]


@dataclass(frozen=True, slots=True)
class Plan:
    name: PlanName
    lookup_key: str | None
    monthly_budget_microusd: int
    burst_per_minute: int
    widget_rpm_per_agent: int
    widget_rpm_per_visitor: int
    max_scan_pages: int


# The Stripe price lookup key of each paid plan.
LOOKUP_KEYS: Final[dict[PaidPlanName, str]] = {
    "starter": "hiredhands_starter_monthly",
    "pro": "hiredhands_pro_monthly",
}

FREE: Final = Plan("free", None, 5_000_000, 30, 60, 10, 50)
STARTER: Final = Plan("starter", LOOKUP_KEYS["starter"], 25_000_000, 60, 120, 20, 500)
PRO: Final = Plan("pro", LOOKUP_KEYS["pro"], 100_000_000, 120, 300, 30, 2_000)

PLANS: Final[dict[PlanName, Plan]] = {plan.name: plan for plan in (FREE, STARTER, PRO)}
_BY_LOOKUP_KEY: Final[dict[str, Plan]] = {p.lookup_key: p for p in PLANS.values() if p.lookup_key}

# Subscription statuses that keep the paid plan. past_due is Stripe's retry window after a failed
# payment: the plan stays until Stripe gives up and moves the subscription to unpaid or canceled.
ENTITLING_STATUSES: Final = frozenset({"active", "trialing", "past_due"})


def plan_for_lookup_key(lookup_key: str | None) -> Plan | None:
    """The plan a Stripe price stands for, or None for a price that is not one of ours."""
    return _BY_LOOKUP_KEY.get(lookup_key) if lookup_key else None


def entitles(status: str | None) -> bool:
    return status in ENTITLING_STATUSES
