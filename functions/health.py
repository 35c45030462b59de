"""GET /api/health (liveness, no dependencies) and GET /api/health/ready (database and Redis)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from mangum import Mangum

from shared.health import readiness
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


app = create_app("health", [router])
lambda_handler = Mangum(app, lifespan="off")
