"""What the catalog itself must say: RLS everywhere it is exposed, secrets unreachable, pinned paths."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.db.conftest import EXPOSED_SCHEMAS, Connection, acting_as, exposed_tables

LINTS = Path(__file__).with_name("splinter.sql")


async def test_every_exposed_table_has_row_level_security(db: Connection):
    await db.execute("reset role")
    rows = await (
        await db.execute(
            "select format('%%I.%%I', n.nspname, c.relname) as name from pg_class c"
            " join pg_namespace n on n.oid = c.relnamespace"
            " where c.relkind in ('r', 'p') and n.nspname = any(%s) and not c.relrowsecurity",
            (list(EXPOSED_SCHEMAS),),
        )
    ).fetchall()
    assert not rows, f"tables without RLS in exposed schemas: {[r['name'] for r in rows]}"


async def test_no_view_or_materialized_view_bypasses_rls(db: Connection):
    await db.execute("reset role")
    rows = await (
        await db.execute(
            "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where c.relkind in ('v', 'm') and n.nspname = any(%s)"
            " and not coalesce('security_invoker=true' = any(c.reloptions), false)",
            (list(EXPOSED_SCHEMAS),),
        )
    ).fetchall()
    assert not rows, f"views that would run with their owner's rights: {rows}"


async def test_every_policy_is_scoped_to_authenticated(db: Connection):
    await db.execute("reset role")
    rows = await (
        await db.execute(
            "select schemaname, tablename, policyname, roles from pg_policies"
            " where schemaname = any(%s) and roles <> '{authenticated}'",
            (list(EXPOSED_SCHEMAS),),
        )
    ).fetchall()
    assert not rows, f"policies not scoped `to authenticated`: {rows}"


async def test_every_org_id_column_leads_an_index(db: Connection):
    # Policies filter on org_id; only the leading column of a btree index serves that filter.
    await db.execute("reset role")
    rows = await (
        await db.execute(
            """
            select format('%%I.%%I', n.nspname, c.relname) as name
            from pg_attribute a
            join pg_class c on c.oid = a.attrelid and c.relkind in ('r', 'p')
            join pg_namespace n on n.oid = c.relnamespace
            where a.attname = 'org_id' and not a.attisdropped and n.nspname = any(%s)
              and not exists (select 1 from pg_index i where i.indrelid = c.oid and i.indkey[0] = a.attnum)
            """,
            (list(EXPOSED_SCHEMAS),),
        )
    ).fetchall()
    assert not rows, f"org_id without an index leading on it: {[r['name'] for r in rows]}"


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_secrets_schema_is_a_permission_error_not_an_empty_result(db: Connection, role: str):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with acting_as(db, role):
            await db.execute("select * from secrets.connection_credentials")


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_client_roles_hold_no_privilege_in_the_secrets_schema(db: Connection, role: str):
    await db.execute("reset role")
    row = await (
        await db.execute(
            """
            select has_schema_privilege(%(role)s, 'secrets', 'usage') as usage,
              exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                      where n.nspname = 'secrets'
                        and has_table_privilege(%(role)s, c.oid, 'select,insert,update,delete')) as tables,
              exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                      where n.nspname = 'secrets' and has_function_privilege(%(role)s, p.oid, 'execute')) as functions
            """,
            {"role": role},
        )
    ).fetchone()
    assert row == {"usage": False, "tables": False, "functions": False}, f"{role} can reach secrets: {row}"


async def test_anon_holds_no_privilege_on_any_table_or_function(db: Connection):
    await db.execute("reset role")
    rows = await (
        await db.execute(
            """
            select c.relname as name from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname in ('public', 'private', 'secrets') and c.relkind in ('r', 'p', 'v', 'm', 'S')
              and has_table_privilege('anon', c.oid, 'select,insert,update,delete,truncate,references,trigger')
            union all
            select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
            where n.nspname in ('public', 'private', 'secrets') and has_function_privilege('anon', p.oid, 'execute')
            """
        )
    ).fetchall()
    assert not rows, f"anon can use: {[r['name'] for r in rows]}"


async def test_every_security_definer_function_pins_search_path(db: Connection):
    await db.execute("reset role")
    rows = await (
        await db.execute(
            """
            select format('%%I.%%I', n.nspname, p.proname) as name from pg_proc p
            join pg_namespace n on n.oid = p.pronamespace
            where p.prosecdef and n.nspname not in ('pg_catalog', 'information_schema', 'auth', 'extensions')
              and not exists (select 1 from unnest(coalesce(p.proconfig, '{}')) c where c like 'search_path=%%')
            """
        )
    ).fetchall()
    assert not rows, f"security definer functions without a pinned search_path: {rows}"


async def test_no_security_definer_function_in_an_exposed_schema(db: Connection):
    await db.execute("reset role")
    rows = await (
        await db.execute(
            "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where p.prosecdef and n.nspname = any(%s)",
            (list(EXPOSED_SCHEMAS),),
        )
    ).fetchall()
    assert not rows, f"security definer functions callable over the Data API: {rows}"


async def test_database_linter_finds_no_error_or_warning(db: Connection):
    await db.execute("reset role")
    async with db.transaction(force_rollback=True):
        await db.execute(sql.SQL("set local pgrst.db_schemas = {}").format(sql.Literal(",".join(EXPOSED_SCHEMAS))))
        findings = await (await db.execute(LINTS.read_text())).fetchall()
    serious = [f for f in findings if f["level"] in ("ERROR", "WARN")]
    assert not serious, f"database linter findings: {serious}"
    # The expected INFOs: the credentials table has RLS and deliberately no policy, and the foreign
    # keys that keep the index they have (next test).
    assert {(f["name"], f["level"]) for f in findings} <= {
        ("rls_enabled_no_policy", "INFO"),
        ("unindexed_foreign_keys", "INFO"),
    }


# Foreign keys whose child already has an index leading with the key's first column that is unique
# or carries the order the hot query reads; why each keeps it is in
# supabase/migrations/20261204030300_index_composite_foreign_keys.sql.
FOREIGN_KEYS_COVERED_BY_THEIR_FIRST_COLUMN = {
    "messages_conversation_fkey": "messages_conversation_id_created_at_idx",
    "deliveries_review_item_fkey": "deliveries_review_item_id_connection_id_key",
    "connection_credentials_connection_fkey": "connection_credentials_pkey",
}


async def test_every_foreign_key_has_a_covering_index(db: Connection):
    """A new foreign key without an index in its own column order fails here (Supabase's lint 0001)."""
    await db.execute("reset role")
    async with db.transaction(force_rollback=True):
        await db.execute(sql.SQL("set local pgrst.db_schemas = {}").format(sql.Literal(",".join(EXPOSED_SCHEMAS))))
        findings = await (await db.execute(LINTS.read_text())).fetchall()
    unindexed = {f["detail"].split(" ")[2].strip('"') for f in findings if f["name"] == "unindexed_foreign_keys"}
    assert unindexed == set(FOREIGN_KEYS_COVERED_BY_THEIR_FIRST_COLUMN), (
        f"foreign keys without a covering index: {sorted(unindexed - set(FOREIGN_KEYS_COVERED_BY_THEIR_FIRST_COLUMN))}"
    )
    # The exceptions hold only while their index still leads with the key's first column.
    rows = await (
        await db.execute(
            """
            select ct.conname, ic.relname as index_name
              from pg_catalog.pg_constraint as ct
              join pg_catalog.pg_index as i on i.indrelid = ct.conrelid and i.indisvalid and i.indkey[0] = ct.conkey[1]
              join pg_catalog.pg_class as ic on ic.oid = i.indexrelid
             where ct.contype = 'f' and ct.conname = any(%s)
            """,
            (list(FOREIGN_KEYS_COVERED_BY_THEIR_FIRST_COLUMN),),
        )
    ).fetchall()
    found = {(r["conname"], r["index_name"]) for r in rows}
    assert set(FOREIGN_KEYS_COVERED_BY_THEIR_FIRST_COLUMN.items()) <= found, found


async def test_the_foreign_key_lint_reports_a_key_without_an_index(db: Connection):
    """The lint is not vacuous: a new child table referencing an agent by (id, org) is reported."""
    await db.execute("reset role")
    async with db.transaction(force_rollback=True):
        await db.execute(
            "create table public.lint_probe (id bigint primary key, agent_id uuid, org_id uuid,"
            " constraint lint_probe_agent_fkey foreign key (agent_id, org_id) references public.agents (id, org_id))"
        )
        await db.execute("create index lint_probe_org_agent_idx on public.lint_probe (org_id, agent_id)")
        findings = await (await db.execute(LINTS.read_text())).fetchall()
    assert any(f["name"] == "unindexed_foreign_keys" and "lint_probe_agent_fkey" in f["detail"] for f in findings), (
        "an index in another column order does not cover the key"
    )


async def test_the_catalog_sees_every_tenant_table(db: Connection):
    tables = await exposed_tables(db)
    assert {"public.agents", "public.usage_events"} <= set(tables)
    assert not any(t.startswith("secrets.") for t in tables)


async def test_signed_in_users_hold_no_privilege_on_tables_outside_the_exposed_schemas(db: Connection):
    # `private` is usable by authenticated for the membership helpers only; its tables stay server-side.
    await db.execute("reset role")
    rows = await (
        await db.execute(
            """
            select format('%%I.%%I', n.nspname, c.relname) as name from pg_class c
            join pg_namespace n on n.oid = c.relnamespace
            where n.nspname in ('private', 'secrets') and c.relkind in ('r', 'p', 'v', 'm', 'S')
              and has_table_privilege('authenticated', c.oid, 'select,insert,update,delete,truncate,references,trigger')
            """
        )
    ).fetchall()
    assert not rows, f"authenticated can use: {[r['name'] for r in rows]}"
