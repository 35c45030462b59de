"""A lazily created connection pool per event loop.

Mangum may start a new event loop for each invocation, and a pool is bound to the loop that
opened it, so pools are keyed by the running loop and never created at import time. The pool
logs in as the NOINHERIT login role: a query that forgets to choose a role fails with a
permission error instead of seeing everything. ``prepare_threshold=None`` because production
sits behind Supabase's transaction pooler, where server-side prepared statements break.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

from shared.db.adapters import register_adapters
from shared.settings import get_settings

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg.rows import DictRow
    from psycopg_pool import AsyncConnectionPool

    Pool = AsyncConnectionPool[AsyncConnection[DictRow]]

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()


async def get_pool() -> Pool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        from psycopg import AsyncConnection
        from psycopg.rows import DictRow, dict_row
        from psycopg_pool import AsyncConnectionPool

        register_adapters()  # before the pool's first connection copies the driver's adapters
        settings = get_settings()
        pool = AsyncConnectionPool(
            settings.database_url.get_secret_value(),
            min_size=0,
            max_size=settings.db_pool_max_size,
            open=False,
            timeout=settings.db_connect_timeout_seconds,
            kwargs={
                "prepare_threshold": None,
                "row_factory": dict_row,
                "connect_timeout": max(1, int(settings.db_connect_timeout_seconds)),
                "autocommit": True,
            },
            connection_class=AsyncConnection[DictRow],
        )
        await pool.open(wait=False)
        _pools[loop] = pool
    return pool


async def close_pools() -> None:
    """Close the pool of the running loop (tests and the local server call this on shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()
