"""The pipelined transactions of ``shared.db.session``: commit, rollback on every kind of failure,
the role ending with the transaction, and the round trips they cost.

Most tests run on the real pool (``committed_db``), the path production takes; the last one on the
test's own transaction, where a transaction is a savepoint.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from shared.db.pool import get_pool
from shared.db.session import as_service, as_user, get_database, run_as_service
from shared.errors import Unprocessable
from tests.conftest import Connection, TransactionDatabase, waits_for_the_server
from tests.factories import create_user, user_claims

_INSERT_ORG = "insert into public.organizations (name) values (%(name)s) returning id"


class Boom(Exception):
    pass


@pytest.fixture
async def admin(admin_url: str, committed_db: None) -> AsyncIterator[Connection]:
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


async def organizations_named(admin: Connection, name: str) -> int:
    row = await (
        await admin.execute("select count(*)::int as n from public.organizations where name = %s", (name,))
    ).fetchone()
    assert row is not None
    return int(row["n"])


def unique_name() -> str:
    return f"Session probe {secrets.token_hex(6)}"


async def test_a_transaction_commits_and_its_role_ends_with_it(admin: Connection) -> None:
    name = unique_name()
    async with as_service(get_database()) as conn:
        role = await (await conn.execute("select current_user as role")).fetchone()
        await conn.execute(_INSERT_ORG, {"name": name})

    assert role == {"role": "service_role"}
    assert await organizations_named(admin, name) == 1
    assert await pooled_identity() == {"role": "authenticator", "claims": ""}, "set for the transaction only"


@pytest.mark.parametrize("failure", ["statement", "exception"])
async def test_a_users_identity_never_outlives_a_failed_transaction_on_the_pooled_connection(
    admin: Connection, failure: str
) -> None:
    # The next request on this pooled connection may be anyone's: a user's role and claims left
    # behind by a failed transaction would let it read that user's organization through RLS.
    user = await create_user(admin)
    with pytest.raises((Unprocessable, Boom)):
        async with as_user(get_database(), user_claims(user)) as conn:
            seen = await (await conn.execute("select current_user as role, auth.uid() as uid")).fetchone()
            assert seen == {"role": "authenticated", "uid": user["id"]}
            if failure == "statement":
                await (await conn.execute("select 1 / 0 as n")).fetchone()
            raise Boom

    assert await pooled_identity() == {"role": "authenticator", "claims": ""}


async def pooled_identity() -> dict[str, str]:
    """Who a statement on the pool's idle connection runs as, outside any transaction of ours."""
    async with (await get_pool()).connection() as pooled:
        row = await (
            await pooled.execute(
                "select current_user::text as role, coalesce(current_setting('request.jwt.claims', true), '') as claims"
            )
        ).fetchone()
    assert row is not None
    return dict(row)


async def test_a_failing_statement_rolls_back_what_came_before_it(admin: Connection) -> None:
    name = unique_name()
    with pytest.raises(Unprocessable):
        async with as_service(get_database()) as conn:
            await conn.execute(_INSERT_ORG, {"name": name})
            await (await conn.execute("select 1 / 0 as n")).fetchone()

    assert await organizations_named(admin, name) == 0
    assert await run_as_service(get_database(), "select 1 as n", {}) == [{"n": 1}], "the connection is usable again"


async def test_statements_read_one_by_one_still_commit_or_fail_together(admin: Connection) -> None:
    # Each fetch flushes the pipeline and waits; only the end of the block syncs, and the Sync is
    # what ends the transaction.
    first, second, third = unique_name(), unique_name(), unique_name()
    with pytest.raises(Unprocessable):
        async with as_service(get_database()) as conn:
            assert await (await conn.execute(_INSERT_ORG, {"name": first})).fetchone()
            assert await (await conn.execute(_INSERT_ORG, {"name": second})).fetchone()
            async with conn.cursor() as cur:
                await cur.executemany(_INSERT_ORG, [{"name": third}, {"name": third}])
            await (await conn.execute("select 1 / 0 as n")).fetchone()

    for name in (first, second, third):
        assert await organizations_named(admin, name) == 0


async def test_a_failing_statement_never_fetched_fails_the_transaction_when_it_ends(admin: Connection) -> None:
    name = unique_name()
    with pytest.raises(Unprocessable):
        async with as_service(get_database()) as conn:
            await conn.execute(_INSERT_ORG, {"name": name})
            await conn.execute("select 1 / 0 as n")  # pipelined: nothing waits for its answer here

    assert await organizations_named(admin, name) == 0
    assert await run_as_service(get_database(), "select 1 as n", {}) == [{"n": 1}]


async def test_an_exception_in_the_block_rolls_the_transaction_back(admin: Connection) -> None:
    name = unique_name()
    with pytest.raises(Boom):
        async with as_service(get_database()) as conn:
            await (await conn.execute(_INSERT_ORG, {"name": name})).fetchone()
            raise Boom

    assert await organizations_named(admin, name) == 0
    async with (await get_pool()).connection() as pooled:
        assert pooled.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_run_as_service_is_one_round_trip_and_returns_the_committed_rows(
    admin: Connection, tmp_path: Path
) -> None:
    name = unique_name()
    trace = tmp_path / "trace.txt"
    pool = await get_pool()
    with open(trace, "w") as sink:  # noqa: ASYNC230 - a local file for libpq to write to
        async with pool.connection() as pooled:  # the pool's one connection, traced from here on
            pooled.pgconn.trace(sink.fileno())
            pooled.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        try:
            rows = await run_as_service(get_database(), _INSERT_ORG, {"name": name})
        finally:
            async with pool.connection() as pooled:
                pooled.pgconn.untrace()

    assert len(rows) == 1
    assert isinstance(rows[0]["id"], uuid.UUID)
    assert await organizations_named(admin, name) == 1
    text = trace.read_text()
    assert "insert into public.organizations" in text, "the traced connection ran the statement"
    assert waits_for_the_server(text) == 1, text


async def test_inside_a_test_transaction_a_failure_rolls_back_to_its_savepoint(db: Connection) -> None:
    database = TransactionDatabase(db)
    kept, lost = unique_name(), unique_name()
    await run_as_service(database, _INSERT_ORG, {"name": kept})
    with pytest.raises(Unprocessable):
        async with as_service(database) as conn:
            await conn.execute(_INSERT_ORG, {"name": lost})
            await (await conn.execute("select 1 / 0 as n")).fetchone()

    await db.execute("reset role")
    rows = await (
        await db.execute("select name from public.organizations where name = any(%s) order by name", ([kept, lost],))
    ).fetchall()
    assert rows == [{"name": kept}], "the outer transaction goes on; only the failed savepoint was undone"


async def test_a_cancelled_transaction_leaves_nothing_behind_and_the_pool_usable(admin: Connection) -> None:
    name = unique_name()

    async def slow() -> None:
        async with as_service(get_database()) as conn:
            await conn.execute(_INSERT_ORG, {"name": name})
            await (await conn.execute("select pg_sleep(5)")).fetchone()

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await run_as_service(get_database(), "select 1 as n", {}) == [{"n": 1}]
    assert await organizations_named(admin, name) == 0
    row = await (
        await admin.execute(
            "select count(*)::int as n from pg_stat_activity where query like %s and state <> 'idle'",
            ("%pg_sleep(5)%",),
        )
    ).fetchone()
    assert row is not None
    assert row["n"] == 0, "the cancelled statement does not keep running on the server"
