"""GET /api/cron/reconcile: metered usage against the provider's own figures, run by Vercel Cron daily.

Only the scheduler may call it (CRON_SECRET bearer). Compares the last few complete UTC days per
model and stores the results; see shared/reconciliation.py. Without an admin key configured there
is nothing to compare with, and the run says so.
"""

from shared.startup import modules_loaded

from fastapi import APIRouter, Request
from mangum import Mangum

from shared.logs import REQUEST_ID
from shared.reconciliation import platform_source, reconcile
from shared.web.app import create_app
from shared.web.cron import CronCaller
from shared.web.deps import Db

router = APIRouter()


@router.get("/api/cron/reconcile")
async def reconcile_usage(_: CronCaller, request: Request, db: Db) -> dict[str, object]:
    source = platform_source()
    if source is None:
        return {"source": None, "skipped": "no provider admin key is configured"}
    report = await reconcile(db, source, request_id=getattr(request.state, REQUEST_ID, "") or "")
    return report.as_dict()


app = create_app("cron_reconcile", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
