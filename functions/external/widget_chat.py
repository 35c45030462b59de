"""The public chat widget: GET /api/widget/{key}/config, POST /api/widget/{key}/chat, and their preflights.

Anyone on the internet can call these; docs/widget.md lists what each answer means and why.
"""

from shared.startup import modules_loaded

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from mangum import Mangum

from shared.web.app import create_app
from shared.web.deps import Db, Queue
from shared.web.sse import EventStreamResponse
from shared.widget import service, streaming
from shared.widget.schemas import ChatReply, ChatRequest, WidgetConfig

router = APIRouter()

OriginHeader = Annotated[str | None, Header(alias="origin")]


@router.get("/api/widget/{key}/config")
async def config(key: str, db: Db, request: Request, origin: OriginHeader = None) -> WidgetConfig:
    served = await service.widget_config(db, key=key, origin=origin)
    request.state.org_id = served.org_id
    return served.body


@router.options("/api/widget/{key}/config")
@router.options("/api/widget/{key}/chat")
async def preflight(key: str, db: Db, origin: OriginHeader = None) -> Response:
    return Response(status_code=204, headers=await service.preflight(db, key=key, origin=origin))


@router.post("/api/widget/{key}/chat", response_model=ChatReply)
async def chat(
    key: str,
    body: ChatRequest,
    request: Request,
    db: Db,
    queue: Queue,
    origin: OriginHeader = None,
    authorization: Annotated[str | None, Header()] = None,
    x_real_ip: Annotated[str | None, Header()] = None,
    accept: Annotated[str | None, Header()] = None,
) -> ChatReply | Response:
    if streaming.wants_event_stream(accept):
        turn = await streaming.open_chat_stream(
            db,
            key=key,
            origin=origin,
            token=service.bearer_token(authorization),
            request=body,
            client_address=service.client_address(x_real_ip, request.client),
            request_id=request.state.request_id,
            queue=queue,
        )
        request.state.org_id = turn.org_id
        return EventStreamResponse(turn.body)
    served = await service.chat(
        db,
        key=key,
        origin=origin,
        token=service.bearer_token(authorization),
        request=body,
        client_address=service.client_address(x_real_ip, request.client),
        request_id=request.state.request_id,
        queue=queue,
    )
    request.state.org_id = served.org_id
    return served.body


# Every answer depends on the Origin it was asked from (CORS), errors included: caches must know.
app = create_app("widget_chat", [router], headers={"Vary": "Origin"})
lambda_handler = Mangum(app, lifespan="off")
modules_loaded()
