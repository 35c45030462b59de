"""Connections: POST /api/connections (verify live, then store), POST /api/connections/{id}/verify
(re-check now), DELETE /api/connections/{id}. Owners and admins only; responses carry a hint of the
secret, never the secret."""

from shared.startup import modules_loaded

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from mangum import Mangum

from shared.connections.providers import ProviderEnvironment, get_provider_environment
from shared.connections.schemas import ConnectionCreate, ConnectionOut
from shared.connections.service import create_connection, delete_connection, verify_connection
from shared.logs import ORG_ID, REQUEST_ID
from shared.web.app import create_app
from shared.web.deps import CurrentClaims, Db

router = APIRouter()
Providers = Annotated[ProviderEnvironment, Depends(get_provider_environment)]


@router.post("/api/connections", status_code=201)
async def create(
    body: ConnectionCreate, request: Request, db: Db, claims: CurrentClaims, env: Providers
) -> ConnectionOut:
    setattr(request.state, ORG_ID, str(body.org_id))
    return await create_connection(db, claims, body, env=env, request_id=getattr(request.state, REQUEST_ID, None))


@router.post("/api/connections/{connection_id}/verify")
async def verify(
    connection_id: uuid.UUID, request: Request, db: Db, claims: CurrentClaims, env: Providers
) -> ConnectionOut:
    return await verify_connection(
        db, claims, connection_id, env=env, request_id=getattr(request.state, REQUEST_ID, None)
    )


@router.delete("/api/connections/{connection_id}", status_code=204)
async def delete(connection_id: uuid.UUID, request: Request, db: Db, claims: CurrentClaims) -> Response:
    await delete_connection(db, claims, connection_id, request_id=getattr(request.state, REQUEST_ID, None))
    return Response(status_code=204)


app = create_app("connection_verify", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
