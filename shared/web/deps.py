"""Typed dependencies, defined once: the verified claims and the two ways into the database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.auth import Claims, verify_access_token
from shared.db.session import Connection, Database, as_service, as_user, get_database
from shared.errors import Unauthorized
from shared.queues import QueueEnvironment, get_queue_environment

_bearer = HTTPBearer(auto_error=False)


async def _claims(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Claims:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Send the dashboard session's access token as a Bearer token.")
    return await verify_access_token(credentials.credentials)


async def get_request_database() -> Database:
    """Where a request's connections come from; tests override it. Async, as every dependency on a
    request's path: FastAPI hands a plain function to a worker thread, a round trip through the
    thread pool (and its locks and wake-ups) per request for what is a constant."""
    return get_database()


CurrentClaims = Annotated[Claims, Depends(_claims)]
Db = Annotated[Database, Depends(get_request_database)]
# Where background work is announced (Vercel Queues); tests override it with the SDK's embedded service.
Queue = Annotated[QueueEnvironment, Depends(get_queue_environment)]


async def _user_db(db: Db, claims: CurrentClaims) -> AsyncIterator[Connection]:
    async with as_user(db, claims) as conn:
        yield conn


async def _service_db(db: Db) -> AsyncIterator[Connection]:
    async with as_service(db) as conn:
        yield conn


UserDb = Annotated[Connection, Depends(_user_db)]
ServiceDb = Annotated[Connection, Depends(_service_db)]
