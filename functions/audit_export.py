"""Audit-log export: GET /api/audit-log/export?org_id=…&from=…&to=…&format=ndjson|csv.

Owners and admins only. The file is streamed in keyset pages and ends with a hash trailer;
``python -m shared.audit.verify`` checks it (docs/audit.md)."""

from shared.startup import modules_loaded

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from mangum import Mangum

from shared.audit.export import open_export
from shared.audit.schemas import ExportQuery
from shared.logs import ORG_ID, REQUEST_ID
from shared.web.app import create_app
from shared.web.deps import CurrentClaims, Db

router = APIRouter()


@router.get("/api/audit-log/export")
async def export(
    query: Annotated[ExportQuery, Query()], request: Request, db: Db, claims: CurrentClaims
) -> StreamingResponse:
    setattr(request.state, ORG_ID, str(query.org_id))
    opened = await open_export(
        db,
        claims,
        org_id=query.org_id,
        start=query.start,
        end=query.end,
        fmt=query.format,
        request_id=getattr(request.state, REQUEST_ID, None),
    )
    headers = {"content-disposition": f'attachment; filename="{opened.filename}"', "x-export-id": str(opened.export_id)}
    return StreamingResponse(opened.body, media_type=opened.media_type, headers=headers)


app = create_app("audit_export", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
