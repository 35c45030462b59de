"""The two ways into the database: as a user, and as the service.

Each opens one transaction and sets its own role and JWT claims with ``set_config(..., true)``,
transaction-local as PostgREST does it, so nothing leaks to the next user of a pooled
connection. Domain functions receive the connection (or, for one statement in its own transaction,
the ``Database``, and go through ``run_as_service``) and never commit, open a pool or set a role.

Transactions run in libpq's pipeline mode (``_pipelined_transaction``): the role and claims and the
caller's statements are sent without waiting for each answer, and the client waits only when it
needs a result (a fetch) and once at the end, when the transaction commits. A transaction whose
statement is fetched inside the block costs two round trips instead of four. A single statement in
its own transaction goes through ``run_as_service``, which reads the rows only after the commit:
one round trip. The domain functions on the widget's path are one statement each and take the
``Database`` for that reason.

The price of pipelining: a failing statement that is never fetched raises when the block ends,
not where it was executed, so code inside a transaction must not catch database errors to carry
on; nothing in the domain does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

from shared.db.errors import map_db_errors
from shared.db.pool import get_pool

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.rows import DictRow
    from psycopg.types.json import Jsonb

    Connection = AsyncConnection[DictRow]
else:
    # The driver is imported when the first connection is made, not when a function starts:
    # a liveness probe or a refused request never pays for it. FastAPI sees the alias at runtime.
    Connection = Any

# PostgREST's search path on Supabase: the exposed schema, then extensions.
_SEARCH_PATH = "public, extensions"

_ENTER = """
select set_config('search_path', %(search_path)s, true),
       set_config('role', %(role)s, true),
       set_config('request.jwt.claims', %(claims)s, true)
"""


def jsonb(value: Any) -> Jsonb:
    """A parameter sent as ``jsonb``. The driver's adapter is imported here, on first use."""
    from psycopg.types.json import Jsonb

    return Jsonb(value)


class Database(Protocol):
    """Where connections come from: the pool in production, one open transaction in tests."""

    def connection(self) -> AbstractAsyncContextManager[Connection]: ...


class PoolDatabase:
    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        pool = await get_pool()
        with map_db_errors():
            async with pool.connection() as conn:
                yield conn


_default_database = PoolDatabase()


def get_database() -> Database:
    return _default_database


_savepoint_numbers = itertools.count()


@asynccontextmanager
async def _pipelined_transaction(conn: Connection) -> AsyncIterator[None]:
    """One transaction on ``conn``, in pipeline mode.

    On an idle connection the transaction is the pipeline itself. PostgreSQL runs the
    extended-protocol messages up to a Sync as one transaction when no ``BEGIN`` opened one ("Sync
    causes the backend to close the current transaction if it's not inside a BEGIN/COMMIT
    transaction block", protocol docs, Extended Query), and psycopg sends the Sync when the pipeline
    ends, never in between: a fetch inside only flushes. So no ``BEGIN`` or ``COMMIT`` is sent, and
    a failed statement aborts everything up to the Sync. An exception raised in the block sends
    ``ROLLBACK`` first, so the Sync cannot commit half a transaction. psycopg's own
    ``conn.transaction()`` would sync the pipeline when it begins and ends, which is the waiting this
    exists to avoid. A connection already in a transaction (the tests') gets a savepoint instead.
    """
    from psycopg.pq import TransactionStatus

    if conn.info.transaction_status == TransactionStatus.IDLE:
        begin, commit, rollback = None, None, "rollback"
    else:
        name = f"hh_transaction_{next(_savepoint_numbers)}"
        begin, commit, rollback = f"savepoint {name}", f"release savepoint {name}", f"rollback to savepoint {name}"
    try:
        async with conn.pipeline():
            if begin is not None:
                await conn.execute(begin)
            try:
                yield
            except BaseException:
                # After a failed statement the server skips this too, up to the Sync, which then ends
                # the failed transaction; psycopg reports the skipped command, which adds nothing.
                with contextlib.suppress(Exception):
                    await conn.execute(rollback)
                raise
            if commit is not None:
                await conn.execute(commit)
    except BaseException:
        # A savepoint outlives the Sync: once the pipeline has synced, undo what a failed statement
        # left aborted so the enclosing transaction can go on.
        if begin is not None and conn.info.transaction_status == TransactionStatus.INERROR:
            with contextlib.suppress(Exception):
                await conn.execute(rollback)
        raise


@asynccontextmanager
async def _as_role(db: Database, role: str, claims: Mapping[str, Any]) -> AsyncIterator[Connection]:
    async with db.connection() as conn:
        with map_db_errors():
            async with _pipelined_transaction(conn):
                await conn.execute(
                    _ENTER,
                    {"search_path": _SEARCH_PATH, "role": role, "claims": json.dumps({**claims, "role": role})},
                )
                yield conn


def as_user(db: Database, claims: Mapping[str, Any]) -> AbstractAsyncContextManager[Connection]:
    """A transaction as the dashboard user: RLS decides, exactly as in the browser."""
    return _as_role(db, "authenticated", claims)


def as_service(db: Database) -> AbstractAsyncContextManager[Connection]:
    """A transaction as the server (public widget, Stripe, workers): bypasses RLS, sees secrets."""
    return _as_role(db, "service_role", {})


async def run_as_service(db: Database, query: str, params: Mapping[str, Any]) -> list[DictRow]:
    """One statement in its own transaction as the server, in one round trip: the statement and the
    commit are sent together and the rows read once the transaction has committed."""
    async with as_service(db) as conn:
        cursor = await conn.execute(query, params)
    return await cursor.fetchall()  # complete since the commit: reading it touches no connection
