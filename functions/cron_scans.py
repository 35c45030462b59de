"""GET /api/cron/scans: the scan sweeper, run by Vercel Cron every minute.

Scans advance in queue steps (functions/queues/scan_steps.py). Only the scheduler may call this
(CRON_SECRET bearer). Each run claims scans whose step message was lost (left alone for a while) or
whose worker died, with FOR UPDATE SKIP LOCKED, works within a time budget and hands what is left
back to the queue; see shared/scans/worker.py.
"""

from shared.startup import modules_loaded

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from mangum import Mangum

from shared.logs import REQUEST_ID
from shared.scans import ScanEnvironment, get_scan_environment, run_scans
from shared.web.app import create_app
from shared.web.cron import CronCaller
from shared.web.deps import Db, Queue

router = APIRouter()


@router.get("/api/cron/scans")
async def scans(
    _: CronCaller,
    request: Request,
    db: Db,
    queue: Queue,
    env: Annotated[ScanEnvironment, Depends(get_scan_environment)],
) -> dict[str, int]:
    report = await run_scans(db, env=env, queue=queue, request_id=getattr(request.state, REQUEST_ID, None))
    return report.as_dict()


app = create_app("cron_scans", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
