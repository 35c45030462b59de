"""GET /api/cron/deliveries: the delivery outbox sweeper, run by Vercel Cron every minute.

Deliveries go out through their queue messages (functions/queues/deliveries.py). Only the scheduler
may call this (CRON_SECRET bearer). Each run claims deliveries due for a while whose message was
lost or never sent, and expired leases, with FOR UPDATE SKIP LOCKED, so overlapping runs and the
queue's subscribers cooperate; see shared/connections/delivery.py.
"""

from shared.startup import modules_loaded

from typing import Annotated

from fastapi import APIRouter, Depends
from mangum import Mangum

from shared.connections.delivery import run_deliveries
from shared.connections.providers import ProviderEnvironment, get_provider_environment
from shared.web.app import create_app
from shared.web.cron import CronCaller
from shared.web.deps import Db

router = APIRouter()


@router.get("/api/cron/deliveries")
async def deliveries(
    _: CronCaller, db: Db, env: Annotated[ProviderEnvironment, Depends(get_provider_environment)]
) -> dict[str, int]:
    report = await run_deliveries(db, env=env)
    return report.as_dict()


app = create_app("cron_deliveries", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
