"""Every review-item status change, by any path, leaves history; illegal transitions are refused."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from shared.local.database import MIGRATIONS
from tests.db.conftest import Connection, acting_as, raises_sqlstate

RENAME_MIGRATION = MIGRATIONS / "20261129100000_rename_review_status_open_to_pending.sql"
# The guards the rename turns off while it rewrites rows, each with its table.
RENAME_GUARDS = (
    ("review_items", "review_items_check_write"),
    ("review_items", "review_items_history_on_status_change"),
    ("review_item_status_history", "review_item_status_history_append_only"),
)


async def _history(db: Connection, item_id: Any) -> list[tuple[str | None, str, str]]:
    await db.execute("reset role")
    rows = await (
        await db.execute(
            "select from_status, to_status, changed_by_role from public.review_item_status_history"
            " where review_item_id = %s order by id",
            (item_id,),
        )
    ).fetchall()
    return [(r["from_status"], r["to_status"], r["changed_by_role"]) for r in rows]


async def _set_status(db: Connection, item_id: Any, status: str) -> None:
    await db.execute("update public.review_items set status = %s where id = %s", (status, item_id))


class TestStatusHistory:
    async def test_creation_is_recorded(self, db: Connection, tenant: dict[str, Any]):
        assert await _history(db, tenant["ids"]["review_item"]) == [(None, "pending", "postgres")]

    async def test_changes_by_a_member_and_by_the_service_are_recorded_with_who(
        self, db: Connection, tenant: dict[str, Any]
    ):
        item = tenant["ids"]["review_item"]
        async with db.transaction():
            await db.execute(
                "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                (json.dumps({"sub": str(tenant["member"]["id"]), "role": "authenticated"}),),
            )
            await _set_status(db, item, "in_progress")
        async with db.transaction():
            await db.execute("select set_config('role', 'service_role', true)")
            await _set_status(db, item, "resolved")
        await db.execute("reset role")
        await _set_status(db, item, "pending")  # as the table owner: still recorded
        history = await _history(db, item)
        assert history[1:] == [
            ("pending", "in_progress", "authenticated"),
            ("in_progress", "resolved", "service_role"),
            ("resolved", "pending", "postgres"),
        ]
        row = await (
            await db.execute(
                "select changed_by from public.review_item_status_history where review_item_id = %s"
                " and to_status = 'in_progress'",
                (item,),
            )
        ).fetchone()
        assert row is not None
        assert row["changed_by"] == tenant["member"]["id"]

    @pytest.mark.parametrize(
        ("path", "illegal"),
        [(["resolved"], "in_progress"), (["dismissed"], "resolved"), (["resolved"], "dismissed")],
    )
    async def test_illegal_transitions_are_refused_by_the_database(
        self, db: Connection, tenant: dict[str, Any], path: list[str], illegal: str
    ):
        item = tenant["ids"]["review_item"]
        await db.execute("reset role")
        for status in path:
            await _set_status(db, item, status)
        for role in ("service_role", "postgres"):
            with raises_sqlstate("HH409", match="illegal review status transition"):
                async with db.transaction(force_rollback=True):
                    await db.execute(f"set local role {role}")
                    await _set_status(db, item, illegal)

    async def test_items_cannot_be_created_already_resolved(self, db: Connection, tenant: dict[str, Any]):
        with raises_sqlstate("HH409"):
            async with acting_as(db, "service_role"):
                await db.execute(
                    "insert into public.review_items (org_id, kind, title, status)"
                    " values (%s, 'lead', 't', 'resolved')",
                    (tenant["org"]["id"],),
                )

    async def test_items_enter_pending_and_open_is_no_longer_a_review_status(
        self, db: Connection, tenant: dict[str, Any]
    ) -> None:
        async with acting_as(db, "service_role"):
            row = await (
                await db.execute(
                    "insert into public.review_items (org_id, kind, title) values (%s, 'lead', 't')"
                    " returning id, status",
                    (tenant["org"]["id"],),
                )
            ).fetchone()
            assert row is not None
            assert row["status"] == "pending"
            assert await _history(db, row["id"]) == [(None, "pending", "service_role")]
        for status in ("in_progress", "open"):
            with raises_sqlstate("HH409", match="created with status pending"):
                async with acting_as(db, "service_role"):
                    await db.execute(
                        "insert into public.review_items (org_id, kind, title, status) values (%s, 'lead', 't', %s)",
                        (tenant["org"]["id"], status),
                    )
        # Behind the trigger, the check constraint refuses 'open' as well.
        await db.execute("reset role")
        with pytest.raises(psycopg.errors.CheckViolation, match="review_items_status_check"):
            async with db.transaction(force_rollback=True):
                await db.execute("alter table public.review_items disable trigger review_items_check_write")
                await _set_status(db, tenant["ids"]["review_item"], "open")

    async def test_the_rename_rewrites_items_and_history_written_as_open(
        self, db: Connection, tenant: dict[str, Any]
    ) -> None:
        item, conversation = tenant["ids"]["review_item"], tenant["ids"]["conversation"]
        await db.execute("reset role")
        async with db.transaction(force_rollback=True):
            # The state before the rename: the old constraint (not checked against this database's
            # 'pending' rows) and default, and rows written as 'open'.
            await db.execute(
                "alter table public.review_items drop constraint review_items_status_check;"
                " alter table public.review_items add constraint review_items_status_check"
                "  check (status in ('open', 'in_progress', 'resolved', 'dismissed')) not valid;"
                " alter table public.review_items alter column status set default 'open'"
            )
            for table, trigger in RENAME_GUARDS:
                await db.execute(f"alter table public.{table} disable trigger {trigger}")
            await db.execute(
                "update public.review_items set status = 'open', updated_at = '2026-01-01T00:00:00Z' where id = %s",
                (item,),
            )
            await db.execute(
                "update public.review_item_status_history set to_status = 'open' where review_item_id = %s", (item,)
            )
            await db.execute(
                "insert into public.review_item_status_history"
                " (org_id, review_item_id, from_status, to_status, changed_by_role)"
                " values (%(org)s, %(item)s, 'open', 'resolved', 'authenticated'),"
                "        (%(org)s, %(item)s, 'resolved', 'open', 'authenticated')",
                {"org": tenant["org"]["id"], "item": item},
            )
            for table, trigger in RENAME_GUARDS:
                await db.execute(f"alter table public.{table} enable trigger {trigger}")

            await db.execute(RENAME_MIGRATION.read_text())

            after = await (
                await db.execute(
                    "select status, updated_at = '2026-01-01T00:00:00Z' as untouched from public.review_items"
                    " where id = %s",
                    (item,),
                )
            ).fetchone()
            assert after == {"status": "pending", "untouched": True}, "renamed, not worked: updated_at stays"
            assert [h[:2] for h in await _history(db, item)] == [
                (None, "pending"),
                ("pending", "resolved"),
                ("resolved", "pending"),
            ], "history is rewritten, and the rename itself is not recorded as a change"
            left = await (
                await db.execute(
                    "select (select count(*) from public.review_items where status = 'open')"
                    "     + (select count(*) from public.review_item_status_history"
                    "         where 'open' in (from_status, to_status)) as n"
                )
            ).fetchone()
            assert left == {"n": 0}
            triggers = await (
                await db.execute(
                    "select tgname, tgenabled from pg_trigger where tgname = any(%s) order by tgname",
                    ([trigger for _, trigger in RENAME_GUARDS],),
                )
            ).fetchall()
            assert [t["tgenabled"] for t in triggers] == ["O", "O", "O"], "every guard is enabled again"
            conversation_row = await (
                await db.execute("select status from public.conversations where id = %s", (conversation,))
            ).fetchone()
            assert conversation_row == {"status": "open"}, "a conversation's 'open' is another status"
            with raises_sqlstate("HH403"):
                async with db.transaction(force_rollback=True):
                    await db.execute(
                        "update public.review_item_status_history set to_status = 'x' where review_item_id = %s",
                        (item,),
                    )

    async def test_members_change_status_but_not_content(self, db: Connection, tenant: dict[str, Any]):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with acting_as(db, "authenticated", tenant["member"]):
                await db.execute(
                    "update public.review_items set payload = '{}' where id = %s", (tenant["ids"]["review_item"],)
                )


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("usage_events", "update public.usage_events set cost_microusd = 0 where org_id = %s"),
        ("usage_events", "delete from public.usage_events where org_id = %s"),
        ("audit_log", "update public.audit_log set action = 'x' where org_id = %s"),
        ("audit_log", "delete from public.audit_log where org_id = %s"),
        ("history", "update public.review_item_status_history set to_status = 'x' where org_id = %s"),
        ("history", "delete from public.review_item_status_history where org_id = %s"),
    ],
)
@pytest.mark.parametrize(
    ("role", "sqlstate"),
    [("service_role", "42501"), ("postgres", "HH403")],
    ids=["service_role-has-no-grant", "table-owner-stopped-by-trigger"],
)
async def test_append_only_tables_refuse_update_and_delete_from_every_role(
    db: Connection, tenant: dict[str, Any], table: str, statement: str, role: str, sqlstate: str
):
    # Client roles have no grant at all (test_rls_matrix); the server role has none either, and
    # even the table owner, which has every grant, is stopped by the trigger.
    await db.execute("reset role")
    with raises_sqlstate(sqlstate):
        async with db.transaction(force_rollback=True):
            await db.execute(f"set local role {role}")
            await db.execute(statement, (tenant["org"]["id"],))


@pytest.mark.parametrize("table", ["usage_events", "audit_log", "review_item_status_history"])
async def test_append_only_tables_cannot_be_truncated(db: Connection, tenant: dict[str, Any], table: str):
    with pytest.raises(psycopg.Error):
        async with db.transaction(force_rollback=True):
            await db.execute("set local role service_role")
            await db.execute(f"truncate public.{table}")
