"""Budget reservations and metering rows, straight against the SQL functions they rely on."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from shared import budgets, metering
from shared.db.session import as_service, get_database
from shared.errors import BudgetExhausted, Forbidden
from shared.metering import Usage
from tests.conftest import Connection, TransactionDatabase
from tests.factories import create_org


async def set_budget(conn: Connection, org_id: uuid.UUID, microusd: int) -> None:
    await conn.execute("reset role")
    await conn.execute(
        "update public.organization_limits set monthly_budget_microusd = %s where org_id = %s", (microusd, org_id)
    )


async def period(conn: Connection, org_id: uuid.UUID) -> tuple[int, int]:
    await conn.execute("reset role")
    cur = await conn.execute(
        "select spent_microusd, reserved_microusd from public.budget_periods where org_id = %s", (org_id,)
    )
    row = await cur.fetchone()
    return (0, 0) if row is None else (row["spent_microusd"], row["reserved_microusd"])


async def reserve(db: Connection, org_id: uuid.UUID, amount: int) -> uuid.UUID:
    return await budgets.reserve(TransactionDatabase(db), org_id=org_id, amount_microusd=amount)


async def record(db: Connection, usage: Usage, reservation_id: uuid.UUID | None) -> int:
    return await metering.record(TransactionDatabase(db), usage, reservation_id=reservation_id)


def usage(org_id: uuid.UUID, **overrides: Any) -> Usage:
    values: dict[str, Any] = {
        "org_id": org_id,
        "kind": "chat",
        "model": "gpt-4o-mini",
        "outcome": "ok",
        "request_id": "req-1",
        **overrides,
    }
    return Usage(**values)


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    return await create_org(db)


class TestLimits:
    async def test_a_new_organization_has_the_default_plan_limits(self, db: Connection, org: dict[str, Any]) -> None:
        async with as_service(TransactionDatabase(db)) as conn:
            limits = await budgets.load_limits(conn, org["id"])
        assert limits is not None
        assert (limits.org_id, limits.plan) == (org["id"], "free")
        assert limits.monthly_budget_microusd > 0
        assert limits.burst_per_minute > 0

    async def test_an_unknown_organization_has_none(self, db: Connection) -> None:
        async with as_service(TransactionDatabase(db)) as conn:
            assert await budgets.load_limits(conn, uuid.uuid4()) is None


class TestReserve:
    async def test_a_reservation_holds_its_amount(self, db: Connection, org: dict[str, Any]) -> None:
        await reserve(db, org["id"], 300)
        await reserve(db, org["id"], 200)
        assert await period(db, org["id"]) == (0, 500)

    async def test_a_reservation_past_the_cap_is_budget_exhausted(self, db: Connection, org: dict[str, Any]) -> None:
        await set_budget(db, org["id"], 1000)
        await reserve(db, org["id"], 600)
        with pytest.raises(BudgetExhausted):
            await reserve(db, org["id"], 401)
        await reserve(db, org["id"], 400)
        assert await period(db, org["id"]) == (0, 1000)

    async def test_an_empty_hold_is_one_micro_dollar_so_a_spent_budget_refuses_even_free_calls(
        self, db: Connection, org: dict[str, Any]
    ) -> None:
        await set_budget(db, org["id"], 1)
        await reserve(db, org["id"], 0)
        assert await period(db, org["id"]) == (0, 1)
        with pytest.raises(BudgetExhausted):
            await reserve(db, org["id"], 0)

    @pytest.mark.usefixtures("committed_db")
    async def test_concurrent_reservations_never_pass_the_cap(self, admin_url: str) -> None:
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as admin:
            org = await create_org(admin)
            await set_budget(admin, org["id"], 500)
            database = get_database()

            async def one() -> uuid.UUID:
                return await budgets.reserve(database, org_id=org["id"], amount_microusd=10)

            outcomes = await asyncio.gather(*(one() for _ in range(100)), return_exceptions=True)

            assert sum(isinstance(o, uuid.UUID) for o in outcomes) == 50
            assert sum(isinstance(o, BudgetExhausted) for o in outcomes) == 50
            assert await period(admin, org["id"]) == (0, 500)


class TestRecord:
    async def test_an_answered_call_settles_its_reservation_to_the_real_cost(
        self, db: Connection, org: dict[str, Any]
    ) -> None:
        reservation = await reserve(db, org["id"], 500)
        row_id = await record(
            db, usage(org["id"], prompt_tokens=10, completion_tokens=5, cost_microusd=42, latency_ms=7), reservation
        )

        assert row_id > 0
        assert await period(db, org["id"]) == (42, 0)
        cur = await db.execute(
            "select status, actual_microusd from public.budget_reservations where id = %s", (reservation,)
        )
        assert await cur.fetchone() == {"status": "settled", "actual_microusd": 42}

    @pytest.mark.parametrize("outcome", ["error", "timeout"])
    async def test_a_failed_call_releases_its_reservation(
        self, db: Connection, org: dict[str, Any], outcome: str
    ) -> None:
        reservation = await reserve(db, org["id"], 500)
        await record(db, usage(org["id"], outcome=outcome), reservation)

        assert await period(db, org["id"]) == (0, 0)
        cur = await db.execute("select status from public.budget_reservations where id = %s", (reservation,))
        assert await cur.fetchone() == {"status": "released"}
        cur = await db.execute("select outcome, cost_microusd from public.usage_events where org_id = %s", (org["id"],))
        assert await cur.fetchall() == [{"outcome": outcome, "cost_microusd": 0}]

    async def test_a_refused_call_is_recorded_without_a_reservation(self, db: Connection, org: dict[str, Any]) -> None:
        await record(db, usage(org["id"], outcome="rejected"), None)
        cur = await db.execute("select outcome from public.usage_events where org_id = %s", (org["id"],))
        assert await cur.fetchall() == [{"outcome": "rejected"}]

    async def test_inconsistent_records_are_refused_before_the_database(self, org: dict[str, Any]) -> None:
        with pytest.raises(ValueError, match="charged"):
            usage(org["id"], outcome="error", cost_microusd=1)

    @pytest.mark.parametrize(("outcome", "has_reservation"), [("ok", False), ("error", False), ("rejected", True)])
    async def test_a_reservation_goes_with_every_call_made_and_only_with_those(
        self, db: Connection, org: dict[str, Any], outcome: str, has_reservation: bool
    ) -> None:
        reservation = await reserve(db, org["id"], 5) if has_reservation else None
        with pytest.raises(ValueError, match="reservation"):
            await record(db, usage(org["id"], outcome=outcome), reservation)

    async def test_usage_rows_are_append_only(self, db: Connection, org: dict[str, Any]) -> None:
        row_id = await record(db, usage(org["id"], outcome="rejected"), None)
        with pytest.raises(Forbidden):
            async with as_service(TransactionDatabase(db)) as conn:
                await conn.execute("update public.usage_events set cost_microusd = 0 where id = %s", (row_id,))
