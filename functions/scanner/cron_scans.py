"""GET /api/cron/scans: the scan worker, run by Vercel Cron every minute.

Only the scheduler may call it (CRON_SECRET bearer). Each run claims queued or interrupted scans
with FOR UPDATE SKIP LOCKED and works within a time budget; see shared/scans/worker.py.
"""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from mangum import Mangum

from shared.logs import REQUEST_ID
from shared.scans import ScanEnvironment, get_scan_environment, run_scans
from shared.web.app import create_app
from shared.web.cron import CronCaller
from shared.web.deps import Db

router = APIRouter()


@router.get("/api/cron/scans")
async def scans(
    _: CronCaller, request: Request, db: Db, env: Annotated[ScanEnvironment, Depends(get_scan_environment)]
) -> dict[str, int]:
    report = await run_scans(db, env=env, request_id=getattr(request.state, REQUEST_ID, None))
    return report.as_dict()


app = create_app("cron_scans", [router])
lambda_handler = Mangum(app, lifespan="off")
