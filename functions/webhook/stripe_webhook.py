"""POST /api/stripe/webhook: Stripe's events, verified on the raw body, recorded and applied exactly once."""

from shared.startup import modules_loaded

from typing import Annotated

from fastapi import APIRouter, Header, Request
from mangum import Mangum

from shared.billing.schemas import WebhookReceipt
from shared.billing.webhooks import receive_event
from shared.logs import REQUEST_ID
from shared.web.app import create_app
from shared.web.deps import Db

router = APIRouter()


@router.post("/api/stripe/webhook")
async def stripe_webhook(
    request: Request, db: Db, stripe_signature: Annotated[str | None, Header()] = None
) -> WebhookReceipt:
    # The raw bytes: the signature covers them exactly, so nothing parses the body first.
    payload = await request.body()
    return await receive_event(db, payload, stripe_signature, request_id=getattr(request.state, REQUEST_ID, None))


# Stripe's events can carry many invoice lines; a refused event would be retried, then dropped.
# Signed by Stripe, and Stripe never sends card numbers: skip the card-data scan (its digits could
# only ever match by accident).
app = create_app("stripe_webhook", [router], max_body_bytes=512 * 1024, scan_for_card_data=False)
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
