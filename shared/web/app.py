"""``create_app``: every function gets the same request id, log line, body limit and error handling.

The middleware is plain ASGI (no BaseHTTPMiddleware) so streaming bodies pass through untouched and
the body limit is enforced while reading, not after buffering an attacker's gigabyte. It is also
where an unexpected exception becomes the opaque 500: Starlette's own last-resort handler runs
outside every user middleware, so its answer would lack the request id, ``Cache-Control`` and the
headers the request had earned (CORS), and a browser could not even read it.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.cards import Path, decode_body, identifier_paths, refuse_card_data
from shared.errors import DomainError, InternalError, PayloadTooLarge
from shared.logs import DECISION_REASON, FUNCTION, LATENCY_MS, METHOD, ORG_ID, REQUEST_ID, ROUTE, STATUS, log_event
from shared.settings import get_settings
from shared.web.headers import answer_headers_scope
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
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Request id, body-size cap, the headers every answer carries, the 500 for anything unexpected,
    and the canonical log line, for one request."""

    def __init__(
        self, app: ASGIApp, *, function: str, max_body_bytes: int, headers: Mapping[str, str] | None = None
    ) -> None:
        self.app = app
        self.function = function
        self.max_body_bytes = max_body_bytes
        self.headers = {name.lower(): value for name, value in (headers or {}).items()}
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

        with answer_headers_scope() as earned:

            async def send_with_id(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status_holder["status"] = message["status"]
                    headers = list(message.get("headers", []))
                    present = {name.lower() for name, _ in headers}
                    # The function's own headers and those the request earned, where the answer has none.
                    for name, value in {**self.headers, **{k.lower(): v for k, v in earned.items()}}.items():
                        if name.encode() not in present:
                            headers.append((name.encode(), value.encode()))
                    headers.append((REQUEST_ID_HEADER, request_id.encode()))
                    headers.append((b"cache-control", b"no-store"))
                    headers.append((b"x-content-type-options", b"nosniff"))
                    message = {**message, "headers": headers}
                    status_holder["started"] = True
                await send(message)

            await self._respond(scope, limited_receive, send_with_id, request_id, status_holder, started)

    async def _respond(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request_id: str,
        status_holder: dict[str, Any],
        started: float,
    ) -> None:
        state = scope["state"]
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        try:
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                # Refuse before reading a byte of it.
                state[DECISION_REASON] = PayloadTooLarge.type_slug
                await _send_problem(send, PayloadTooLarge(self._too_large_detail), request_id)
                return
            await self.app(scope, receive, send)
        except Exception as exc:
            # Nothing else handled it: an opaque 500, logged by type only (a message can carry SQL or secrets).
            state[DECISION_REASON] = InternalError.type_slug
            log_event(
                "unhandled error",
                logging.ERROR,
                **{REQUEST_ID: request_id, FUNCTION: self.function, DECISION_REASON: InternalError.type_slug},
                error_type=type(exc).__name__,
            )
            if status_holder.get("started"):
                raise  # the answer is half sent; only the server can end it
            status_holder["status"] = InternalError.status
            await _send_problem(send, InternalError(), request_id)
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


# Routes are unhashable; keyed by id, with the route kept so an id is never reused while cached.
_identifier_paths: dict[int, tuple[BaseRoute, frozenset[Path]]] = {}


def _route_identifier_paths(route: Any) -> frozenset[Path]:
    """Where the route's body schema holds machine values (``shared.cards.Identifier``), once per route."""
    if not isinstance(route, BaseRoute):
        return frozenset()
    cached = _identifier_paths.get(id(route))
    if cached is None:
        body_field = getattr(route, "body_field", None)
        paths = identifier_paths(body_field.field_info.annotation) if body_field is not None else frozenset()
        cached = _identifier_paths[id(route)] = (route, paths)
    return cached[1]


def _has_unpaired_surrogate(document: Any) -> bool:
    """JSON's ``\\ud800`` escapes decode to code points that are not characters and that no database
    or UTF-8 encoder accepts."""
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str) and not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value):
            return True
    return False


async def _inspect_body(request: Request) -> None:
    """Card data never touches our servers: a body carrying any is refused before a handler, the
    authentication or the database sees it. The body is read as the application's parser reads it
    (``shared.cards.decode_body``), so encodings and escapes hide nothing."""
    raw = await request.body()
    if not raw:
        return
    document = decode_body(raw, request.headers.get("content-type"))
    refuse_card_data(document, _route_identifier_paths(request.scope.get("route")))
    if _has_unpaired_surrogate(document):
        raise RequestValidationError(
            [
                {
                    "type": "string_unicode",
                    "loc": ("body",),
                    "msg": "Text must be valid Unicode: a \\u escape names half of a surrogate pair",
                }
            ]
        )


def create_app(
    function: str,
    routers: Iterable[APIRouter],
    *,
    max_body_bytes: int | None = None,
    scan_for_card_data: bool = True,
    headers: Mapping[str, str] | None = None,
    **fastapi_kwargs: Any,
) -> FastAPI:
    """The app for one function.

    ``max_body_bytes`` overrides the default body cap. ``scan_for_card_data=False`` is only for
    bodies whose sender is verified by signature and never carries card numbers (Stripe's events).
    ``headers`` go on every answer of the function, errors and the 500 included (the widget's
    ``Vary: Origin``).
    """
    settings = get_settings()
    if scan_for_card_data:
        fastapi_kwargs["dependencies"] = [Depends(_inspect_body), *fastapi_kwargs.get("dependencies", [])]
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
        RequestContextMiddleware,
        function=function,
        max_body_bytes=max_body_bytes or settings.max_body_bytes,
        headers=headers,
    )
    return app
