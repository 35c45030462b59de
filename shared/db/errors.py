"""SQLSTATE -> domain error, in one place.

Our own triggers and functions raise with custom SQLSTATEs (class HH) and curated messages that
are safe to show; everything else gets a generic message so no SQL text or value leaks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from shared.errors import (
    BudgetExhausted,
    Conflict,
    DependencyUnavailable,
    DomainError,
    Forbidden,
    Unprocessable,
)

if TYPE_CHECKING:
    import psycopg

# Raised by our own SQL (supabase/migrations) with messages written for the caller.
CURATED: dict[str, type[DomainError]] = {
    "HH402": BudgetExhausted,
    "HH403": Forbidden,
    "HH409": Conflict,
    "HH422": Unprocessable,
}


def translate(exc: psycopg.Error) -> DomainError | None:
    import psycopg
    from psycopg import errors as pg

    sqlstate = exc.sqlstate or ""
    if sqlstate in CURATED:
        return CURATED[sqlstate](exc.diag.message_primary)
    if isinstance(exc, pg.InsufficientPrivilege):
        return Forbidden("You do not have permission to do this.")
    if isinstance(exc, pg.UniqueViolation):
        return Conflict("This already exists.")
    if isinstance(exc, pg.ForeignKeyViolation):
        return Unprocessable("This refers to something that does not exist.")
    if isinstance(exc, pg.CheckViolation | pg.NotNullViolation | pg.DataError):
        return Unprocessable("A value is out of range or malformed.")
    if isinstance(exc, pg.QueryCanceled | pg.LockNotAvailable):
        return DependencyUnavailable("The database took too long to answer.")
    if isinstance(exc, psycopg.OperationalError):
        return DependencyUnavailable("The database is unavailable.")
    return None


@contextmanager
def map_db_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        # psycopg is imported lazily; if it was never imported, this cannot be one of its errors.
        psycopg = sys.modules.get("psycopg")
        if psycopg is None or not isinstance(exc, psycopg.Error):
            raise
        domain = translate(exc)
        if domain is None:
            raise
        raise domain from exc
