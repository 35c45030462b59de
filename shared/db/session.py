"""The two ways into the database: as a user, and as the service.

Each opens one transaction and sets its own role and JWT claims with ``set_config(..., true)``,
transaction-local as PostgREST does it, so nothing leaks to the next user of a pooled
connection. Domain functions receive the connection and never commit, open a pool or set a role.
"""

from __future__ import annotations

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


@asynccontextmanager
async def _as_role(db: Database, role: str, claims: Mapping[str, Any]) -> AsyncIterator[Connection]:
    async with db.connection() as conn:
        with map_db_errors():
            async with conn.transaction():
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
