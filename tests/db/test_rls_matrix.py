"""The tenant wall, from the attacker's side, for every table the Data API exposes.

Tables are enumerated from the catalog, so a table added later is covered without anyone
remembering to add it here: the first test fails until the tenant fixture gives it a row.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.db.conftest import Connection, acting_as, exposed_tables

pytestmark = pytest.mark.usefixtures("tenant")


def _ident(table: str) -> sql.Composable:
    schema, name = table.split(".")
    return sql.Identifier(schema, name)


def _org_column(table: str) -> str:
    return "id" if table == "public.organizations" else "org_id"


async def _rows_of(conn: Connection, table: str, org_id: uuid.UUID) -> int:
    query = sql.SQL("select count(*) as n from {} where {} = %s").format(
        _ident(table), sql.Identifier(_org_column(table))
    )
    row = await (await conn.execute(query, (org_id,))).fetchone()
    assert row is not None
    return int(row["n"])


async def _granted_columns(conn: Connection, table: str, privilege: str) -> list[str]:
    schema, name = table.split(".")
    rows = await (
        await conn.execute(
            "select column_name from information_schema.column_privileges"
            " where grantee = 'authenticated' and table_schema = %s and table_name = %s and privilege_type = %s"
            " order by column_name",
            (schema, name, privilege),
        )
    ).fetchall()
    return [r["column_name"] for r in rows]


async def _a_row(conn: Connection, table: str, org_id: uuid.UUID) -> dict[str, Any]:
    await conn.execute("reset role")
    query = sql.SQL("select * from {} where {} = %s limit 1").format(_ident(table), sql.Identifier(_org_column(table)))
    row = await (await conn.execute(query, (org_id,))).fetchone()
    assert row is not None
    return dict(row)


@pytest.fixture
async def tables(db: Connection) -> list[str]:
    return await exposed_tables(db)


async def test_every_exposed_table_has_a_row_of_tenant_a(db: Connection, tenant: dict[str, Any], tables: list[str]):
    await db.execute("reset role")
    empty = [t for t in tables if await _rows_of(db, t, tenant["org"]["id"]) == 0]
    assert not empty, f"give these tables a row in tests/db/conftest.py::tenant so the matrix covers them: {empty}"


async def test_member_of_b_sees_none_of_a(db: Connection, tenant: dict[str, Any], outsider_admin, tables: list[str]):
    for table in tables:
        try:
            async with acting_as(db, "authenticated", outsider_admin):
                seen = await _rows_of(db, table, tenant["org"]["id"])
        except psycopg.errors.InsufficientPrivilege:
            continue  # no read grant at all is an even stronger wall
        assert seen == 0, f"{table}: a member of another organization sees {seen} of A's rows"


async def test_member_of_b_updates_none_of_a(db: Connection, tenant: dict[str, Any], outsider_admin, tables: list[str]):
    for table in tables:
        columns = await _granted_columns(db, table, "UPDATE")
        target = columns[0] if columns else _org_column(table)
        query = sql.SQL("update {} set {col} = {col} where {org} = %s returning 1").format(
            _ident(table), col=sql.Identifier(target), org=sql.Identifier(_org_column(table))
        )
        try:
            async with acting_as(db, "authenticated", outsider_admin):
                changed = (await db.execute(query, (tenant["org"]["id"],))).rowcount
        except psycopg.errors.InsufficientPrivilege:
            continue
        assert changed == 0, f"{table}: a member of another organization updated {changed} of A's rows"


async def test_member_of_b_deletes_none_of_a(db: Connection, tenant: dict[str, Any], outsider_admin, tables: list[str]):
    for table in tables:
        query = sql.SQL("delete from {} where {} = %s returning 1").format(
            _ident(table), sql.Identifier(_org_column(table))
        )
        try:
            async with acting_as(db, "authenticated", outsider_admin):
                deleted = (await db.execute(query, (tenant["org"]["id"],))).rowcount
        except psycopg.errors.InsufficientPrivilege:
            continue
        assert deleted == 0, f"{table}: a member of another organization deleted {deleted} of A's rows"
    await db.execute("reset role")
    for table in tables:
        assert await _rows_of(db, table, tenant["org"]["id"]) > 0, f"{table}: A's rows are gone"


async def test_member_of_b_inserts_nothing_into_a(
    db: Connection, tenant: dict[str, Any], outsider_admin, tables: list[str]
):
    for table in tables:
        if table == "public.organizations":
            continue  # creating an organization of one's own is allowed; it is not A
        columns = await _granted_columns(db, table, "INSERT")
        if not columns:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with acting_as(db, "authenticated", outsider_admin):
                    await db.execute(sql.SQL("insert into {} default values").format(_ident(table)))
            continue
        row = await _a_row(db, table, tenant["org"]["id"])
        values = {c: row[c] for c in columns}
        if "user_id" in values:
            values["user_id"] = outsider_admin["id"]
        if "role" in values:
            values["role"] = "member"  # the least a member of B could ask for
        if "name" in values:
            values["name"] = f"copy {uuid.uuid4().hex[:6]}"
        values = {c: Jsonb(v) if isinstance(v, dict) else v for c, v in values.items()}
        query = sql.SQL("insert into {} ({}) values ({})").format(
            _ident(table),
            sql.SQL(", ").join(sql.Identifier(c) for c in values),
            sql.SQL(", ").join(sql.Placeholder(c) for c in values),
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            async with acting_as(db, "authenticated", outsider_admin):
                await db.execute(query, values)


async def test_anon_reads_nothing_at_all(db: Connection, tables: list[str]):
    for table in tables:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with acting_as(db, "anon"):
                await db.execute(sql.SQL("select 1 from {} limit 1").format(_ident(table)))


async def test_service_role_sees_every_row_of_a(db: Connection, tenant: dict[str, Any], tables: list[str]):
    for table in tables:
        async with acting_as(db, "service_role"):
            assert await _rows_of(db, table, tenant["org"]["id"]) > 0, f"{table}: service_role cannot see A's rows"


async def test_members_of_a_see_their_own_rows(db: Connection, tenant: dict[str, Any]):
    async with acting_as(db, "authenticated", tenant["member"]):
        for table in (
            "public.agents",
            "public.conversations",
            "public.messages",
            "public.review_items",
            "public.usage_events",
            "public.knowledge_chunks",
            "public.connections",
        ):
            assert await _rows_of(db, table, tenant["org"]["id"]) > 0, f"a member of A cannot read {table}"


async def test_login_role_without_a_role_switch_sees_nothing(db: Connection, tables: list[str]):
    # A forgotten role switch is a permission error, never a view of everything.
    for table in tables:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with db.transaction(force_rollback=True):
                await db.execute("set local role authenticator")
                await db.execute(sql.SQL("select 1 from {} limit 1").format(_ident(table)))


class TestRoleSpecificRules:
    async def test_plain_member_cannot_manage_agents(self, db: Connection, tenant: dict[str, Any]):
        org_id = tenant["org"]["id"]
        async with acting_as(db, "authenticated", tenant["member"]):
            changed = (await db.execute("update public.agents set name = 'x' where org_id = %s", (org_id,))).rowcount
            assert changed == 0, "a plain member renamed an agent"
            deleted = (await db.execute("delete from public.agents where org_id = %s", (org_id,))).rowcount
            assert deleted == 0, "a plain member deleted an agent"
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with acting_as(db, "authenticated", tenant["member"]):
                await db.execute("insert into public.agents (org_id, name) values (%s, 'mine')", (org_id,))

    async def test_admin_manages_agents(self, db: Connection, tenant: dict[str, Any]):
        async with acting_as(db, "authenticated", tenant["admin"]):
            changed = (
                await db.execute("update public.agents set name = 'renamed' where org_id = %s", (tenant["org"]["id"],))
            ).rowcount
        assert changed == 1

    async def test_plain_member_cannot_manage_connections(self, db: Connection, tenant: dict[str, Any]):
        org_id = tenant["org"]["id"]
        async with acting_as(db, "authenticated", tenant["member"]):
            changed = (
                await db.execute("update public.connections set name = 'x' where org_id = %s", (org_id,))
            ).rowcount
            deleted = (await db.execute("delete from public.connections where org_id = %s", (org_id,))).rowcount
        assert (changed, deleted) == (0, 0), "a plain member changed or deleted a connection"

    async def test_nobody_on_the_client_writes_the_widget_key_hash(self, db: Connection, tenant: dict[str, Any]):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with acting_as(db, "authenticated", tenant["owner"]):
                await db.execute(
                    "update public.agents set widget_key_hash = sha256('chosen'::bytea) where org_id = %s",
                    (tenant["org"]["id"],),
                )

    async def test_admin_cannot_promote_themself_to_owner(self, db: Connection, tenant: dict[str, Any]):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with acting_as(db, "authenticated", tenant["admin"]):
                await db.execute(
                    "update public.memberships set role = 'owner' where org_id = %s and user_id = %s",
                    (tenant["org"]["id"], tenant["admin"]["id"]),
                )

    @pytest.mark.parametrize(
        "statement",
        [
            "insert into public.usage_events (org_id, kind, model, outcome) values (%s, 'chat', 'x', 'ok')",
            "insert into public.audit_log (org_id, actor, action) values (%s, 'user', 'forged')",
            "insert into public.review_item_status_history (org_id, review_item_id, to_status, changed_by_role)"
            " select %s, id, 'resolved', 'x' from public.review_items limit 1",
            "insert into public.stripe_events (id, type, org_id) values ('evt_forged', 'x', %s)",
            "insert into public.budget_periods (org_id, period_start) values (%s, '2030-01-01')",
        ],
        ids=["usage", "audit", "history", "ledger", "budget"],
    )
    async def test_no_client_writes_usage_ledger_history_or_budgets(
        self, db: Connection, tenant: dict[str, Any], statement: str
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with acting_as(db, "authenticated", tenant["owner"]):
                await db.execute(statement, (tenant["org"]["id"],))
