"""Plans in code agree with the database and with Stripe's lookup keys."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import DictRow

from shared.billing.plans import FREE, LOOKUP_KEYS, PLANS, PRO, STARTER, entitles, plan_for_lookup_key

Connection = AsyncConnection[DictRow]

_DEFAULTS = """
select column_name, column_default
  from information_schema.columns
 where table_schema = 'public' and table_name = 'organization_limits'
"""


class TestPlans:
    async def test_free_is_exactly_what_a_new_organization_gets(self, db: Connection) -> None:
        await db.execute("reset role")
        rows: dict[str, Any] = {
            r["column_name"]: r["column_default"] for r in await (await db.execute(_DEFAULTS)).fetchall()
        }
        assert rows["plan"] == "'free'::text"
        for column in (
            "monthly_budget_microusd",
            "burst_per_minute",
            "widget_rpm_per_agent",
            "widget_rpm_per_visitor",
            "max_scan_pages",
        ):
            assert int(rows[column]) == getattr(FREE, column), f"plans.FREE.{column} differs from the column default"

    def test_each_paid_plan_has_a_distinct_lookup_key_and_free_has_none(self) -> None:
        assert FREE.lookup_key is None
        assert {PLANS[name].lookup_key for name in LOOKUP_KEYS} == set(LOOKUP_KEYS.values())
        assert len(set(LOOKUP_KEYS.values())) == len(LOOKUP_KEYS)

    def test_plans_grow(self) -> None:
        for smaller, larger in ((FREE, STARTER), (STARTER, PRO)):
            for field in ("monthly_budget_microusd", "burst_per_minute", "widget_rpm_per_agent", "max_scan_pages"):
                assert getattr(smaller, field) < getattr(larger, field), field

    def test_lookup(self) -> None:
        assert plan_for_lookup_key("hiredhands_pro_monthly") is PRO
        assert plan_for_lookup_key("someone_elses_price") is None
        assert plan_for_lookup_key(None) is None

    def test_entitling_statuses(self) -> None:
        assert all(entitles(s) for s in ("active", "trialing", "past_due"))
        assert not any(entitles(s) for s in ("canceled", "unpaid", "incomplete", "incomplete_expired", "paused", None))
