"""The push callback of a Vercel Queues subscriber function.

Vercel invokes a function that has a ``queue/v2beta`` trigger (vercel.json) with each message of its
topic: a POST whose CloudEvent headers name the message, its receipt and the consumer group, and
whose ``x-vercel-oidc-token`` lets the SDK acknowledge it. ``accept_and_handle`` (vercel-queue)
accepts the delivery, keeps its lease alive while the subscriber registered with ``@subscribe``
runs, and acknowledges it, or makes it visible again after the delay the subscriber asked for
(``RetryAfter``). The same adapter as Vercel's own Python runtime uses for queue services
(``vercel_runtime.workers``), on the project's app factory.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from vercel.headers import HeadersContext
from vercel.queue import ProtocolError, accept_and_handle

from shared.errors import BadRequest

router = APIRouter()


@router.post("/{_path:path}", status_code=204, include_in_schema=False)
async def receive(request: Request) -> Response:
    """Any path: the platform calls the function itself, not a rewritten route."""
    headers = dict(request.headers)
    try:
        with HeadersContext(headers).use():  # the SDK reads the invocation's OIDC token from here
            await accept_and_handle(request.stream(), headers)
    except (ProtocolError, TypeError, ValueError) as exc:
        raise BadRequest("This is not a queue delivery.") from exc
    return Response(status_code=204)
