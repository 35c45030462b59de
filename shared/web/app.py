"""``create_app``: every function gets the same request id, log line, body limit and error handling.

The middleware is plain ASGI (no BaseHTTPMiddleware) so streaming bodies pass through untouched and
the body limit is enforced while reading, not after buffering an attacker's gigabyte.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.cards import refuse_card_data
from shared.errors import DomainError, PayloadTooLarge
from shared.logs import DECISION_REASON, FUNCTION, LATENCY_MS, METHOD, ORG_ID, REQUEST_ID, ROUTE, STATUS, log_event
from shared.settings import get_settings
from shared.web.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE, install_problem_handlers

REQUEST_ID_HEADER = b"x-request-id"


async def _send_problem(send: Send, error: DomainError, request_id: str) -> None:
    body = json.dumps(
        {
            "type": PROBLEM_BASE + error.type_slug,
            "title": error.title,
            "status": error.status,
            "detail": error.detail,
            REQUEST_ID: request_id,
        }
    ).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Request id, body-size cap and the canonical log line for one request."""

    def __init__(self, app: ASGIApp, *, function: str, max_body_bytes: int) -> None:
        self.app = app
        self.function = function
        self.max_body_bytes = max_body_bytes
        self._too_large_detail = f"Request bodies are limited to {max_body_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = "req_" + secrets.token_hex(12)
        state = scope.setdefault("state", {})
        state[REQUEST_ID] = request_id
        status_holder = {"status": 500}

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException, because FastAPI turns anything else raised while it
                    # reads the body into a generic 400.
                    raise HTTPException(413, self._too_large_detail)
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, request_id.encode()))
                headers.append((b"cache-control", b"no-store"))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                # Refuse before reading a byte of it.
                state[DECISION_REASON] = PayloadTooLarge.type_slug
                await _send_problem(send_with_id, PayloadTooLarge(self._too_large_detail), request_id)
                return
            await self.app(scope, limited_receive, send_with_id)
        finally:
            route = scope.get("route")
            log_event(
                "request",
                **{
                    REQUEST_ID: request_id,
                    FUNCTION: self.function,
                    METHOD: scope.get("method"),
                    # The route template, never the raw path: paths can carry widget keys.
                    ROUTE: getattr(route, "path", None),
                    STATUS: status_holder["status"],
                    LATENCY_MS: round((time.perf_counter() - started) * 1000, 2),
                    ORG_ID: state.get(ORG_ID),
                    DECISION_REASON: state.get(DECISION_REASON),
                },
            )


async def _refuse_card_data(request: Request) -> None:
    """Card data never touches our servers: a body carrying any is refused before it is parsed or stored."""
    if request.method in ("POST", "PUT", "PATCH"):
        refuse_card_data(await request.body())


def create_app(
    function: str,
    routers: Iterable[APIRouter],
    *,
    max_body_bytes: int | None = None,
    scan_for_card_data: bool = True,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """The app for one function.

    ``max_body_bytes`` overrides the default body cap. ``scan_for_card_data=False`` is only for
    bodies whose sender is verified by signature and never carries card numbers (Stripe's events).
    """
    settings = get_settings()
    if scan_for_card_data:
        fastapi_kwargs["dependencies"] = [Depends(_refuse_card_data), *fastapi_kwargs.get("dependencies", [])]
    app = FastAPI(
        title=f"HiredHands {function}",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        **fastapi_kwargs,
    )
    for router in routers:
        app.include_router(router)
    install_problem_handlers(app)
    app.add_middleware(
        RequestContextMiddleware, function=function, max_body_bytes=max_body_bytes or settings.max_body_bytes
    )
    return app
