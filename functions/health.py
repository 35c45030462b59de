"""GET /api/health (liveness, no dependencies), GET /api/health/ready (database and Redis) and
GET /api/health/metering (the usage reconciliation: ``status`` is ``drift`` or ``stale`` when someone
should look; always a 200, since the function itself is healthy: monitors alert on the body)."""

from shared.startup import modules_loaded

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from mangum import Mangum

from shared.health import readiness
from shared.reconciliation import metering_health
from shared.web.app import create_app
from shared.web.deps import Db

router = APIRouter()


@router.get("/api/health")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/api/health/ready")
async def ready(db: Db) -> JSONResponse:
    report = await readiness(db)
    return JSONResponse(report.model_dump(), status_code=200 if report.status == "ready" else 503)


@router.get("/api/health/metering")
async def metering(db: Db) -> dict[str, object]:
    report = await metering_health(db)
    return report.as_dict()


app = create_app("health", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
