"""POST /api/billing/checkout and POST /api/billing/portal: a Stripe-hosted page's URL for owners and
admins. No card data is accepted: like every endpoint, a body carrying any is refused before it is
parsed."""

from shared.startup import modules_loaded

from fastapi import APIRouter, Request
from mangum import Mangum

from shared.billing.checkout import open_portal, start_checkout
from shared.billing.schemas import CheckoutRequest, PortalRequest, RedirectOut
from shared.logs import ORG_ID, REQUEST_ID
from shared.web.app import create_app
from shared.web.deps import CurrentClaims, Db

# Every function's app refuses bodies carrying card data (shared.web.app.create_app).
router = APIRouter()


@router.post("/api/billing/checkout")
async def checkout(body: CheckoutRequest, request: Request, db: Db, claims: CurrentClaims) -> RedirectOut:
    setattr(request.state, ORG_ID, str(body.org_id))
    return await start_checkout(db, claims, body, request_id=getattr(request.state, REQUEST_ID, None))


@router.post("/api/billing/portal")
async def portal(body: PortalRequest, request: Request, db: Db, claims: CurrentClaims) -> RedirectOut:
    setattr(request.state, ORG_ID, str(body.org_id))
    return await open_portal(db, claims, body, request_id=getattr(request.state, REQUEST_ID, None))


app = create_app("billing", [router])
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
