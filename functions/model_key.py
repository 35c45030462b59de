"""Bring your own key: PUT /api/model-key (save or rotate, checked live first), GET /api/model-key?org_id=…
(settings and a hint, never the key), PATCH /api/model-key (what happens when the key fails),
DELETE /api/model-key?org_id=… (back to the platform key). Owners and admins only."""

from shared.startup import modules_loaded

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from mangum import Mangum

from shared.gateway.keys import ModelKeyEnvironment, get_model_key_environment
from shared.logs import ORG_ID, REQUEST_ID
from shared.model_keys import (
    ModelKeyOut,
    ModelKeySave,
    ModelKeySettings,
    read,
    remove,
    save,
    update_settings,
)
from shared.web.app import create_app
from shared.web.deps import CurrentClaims, Db

router = APIRouter()
Environment = Annotated[ModelKeyEnvironment, Depends(get_model_key_environment)]


@router.put("/api/model-key")
async def put(body: ModelKeySave, request: Request, db: Db, claims: CurrentClaims, env: Environment) -> ModelKeyOut:
    setattr(request.state, ORG_ID, str(body.org_id))
    return await save(db, claims, body, env=env, request_id=getattr(request.state, REQUEST_ID, None))


@router.get("/api/model-key")
async def get(org_id: uuid.UUID, db: Db, claims: CurrentClaims) -> ModelKeyOut:
    return await read(db, claims, org_id)


@router.patch("/api/model-key")
async def patch(body: ModelKeySettings, request: Request, db: Db, claims: CurrentClaims) -> ModelKeyOut:
    return await update_settings(db, claims, body, request_id=getattr(request.state, REQUEST_ID, None))


@router.delete("/api/model-key", status_code=204)
async def delete(org_id: uuid.UUID, request: Request, db: Db, claims: CurrentClaims) -> Response:
    await remove(db, claims, org_id, request_id=getattr(request.state, REQUEST_ID, None))
    return Response(status_code=204)


app = create_app("model_key", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
