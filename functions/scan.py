"""Site scans: POST /api/scans (owners and admins queue a scan of their site for an agent) and
GET /api/scans/{id} (members read its progress; the dashboard can also read it through RLS)."""

from shared.startup import modules_loaded

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from mangum import Mangum

from shared.logs import REQUEST_ID
from shared.scans import ScanCreate, ScanEnvironment, ScanOut, create_scan, get_scan, get_scan_environment
from shared.web.app import create_app
from shared.web.deps import CurrentClaims, Db, Queue

router = APIRouter()
Environment = Annotated[ScanEnvironment, Depends(get_scan_environment)]


@router.post("/api/scans", status_code=201)
async def create(
    body: ScanCreate, request: Request, db: Db, claims: CurrentClaims, env: Environment, queue: Queue
) -> ScanOut:
    return await create_scan(
        db, claims, body, env=env, queue=queue, request_id=getattr(request.state, REQUEST_ID, None)
    )


@router.get("/api/scans/{scan_id}")
async def read(scan_id: uuid.UUID, db: Db, claims: CurrentClaims) -> ScanOut:
    return await get_scan(db, claims, scan_id)


app = create_app("scan", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
