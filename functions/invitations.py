"""Team invitations: POST /api/invitations (invite by email with a role), GET /api/invitations?org_id=…
(the organization's invitations), DELETE /api/invitations/{id} (revoke a pending one). Owners and
admins only, never above their own role."""

from shared.startup import modules_loaded

import uuid

from fastapi import APIRouter, Request
from mangum import Mangum

from shared.invitations.schemas import InvitationCreate, InvitationList, InvitationOut
from shared.invitations.service import invite, list_invitations, revoke
from shared.logs import ORG_ID, REQUEST_ID
from shared.web.app import create_app
from shared.web.deps import CurrentClaims, Db

router = APIRouter()


@router.post("/api/invitations", status_code=201)
async def create(body: InvitationCreate, request: Request, db: Db, claims: CurrentClaims) -> InvitationOut:
    setattr(request.state, ORG_ID, str(body.org_id))
    return await invite(db, claims, body, request_id=getattr(request.state, REQUEST_ID, None))


@router.get("/api/invitations")
async def read(org_id: uuid.UUID, db: Db, claims: CurrentClaims) -> InvitationList:
    return await list_invitations(db, claims, org_id)


@router.delete("/api/invitations/{invitation_id}")
async def delete(invitation_id: uuid.UUID, request: Request, db: Db, claims: CurrentClaims) -> InvitationOut:
    return await revoke(db, claims, invitation_id, request_id=getattr(request.state, REQUEST_ID, None))


app = create_app("invitations", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
