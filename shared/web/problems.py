"""RFC 9457 problem documents: the one place errors become responses.

Validation errors report ``loc`` and ``msg`` but never the submitted ``input`` (a mistyped token
must not be echoed back). Anything unexpected becomes an opaque 500 with only a request id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.egress import EgressDenied
from shared.errors import DomainError
from shared.logs import DECISION_REASON, REQUEST_ID, log_event

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://hiredhands.dev/problems/"

_HTTP_SLUGS = {404: "not-found", 405: "method-not-allowed", 413: "payload-too-large", 415: "unsupported-media-type"}


def problem(
    request: Request,
    *,
    status: int,
    slug: str,
    title: str,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    request_id = getattr(request.state, REQUEST_ID, None)
    request.state.decision_reason = slug
    body: dict[str, Any] = {"type": PROBLEM_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    if extra:
        body.update(extra)
    body[REQUEST_ID] = request_id
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, DomainError):  # registered for this type only
        raise exc
    return problem(
        request, status=exc.status, slug=exc.type_slug, title=exc.title, detail=exc.detail, headers=exc.headers
    )


async def _egress_denied(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, EgressDenied):  # registered for this type only
        raise exc
    # The customer's URL is refused by a rule; the message names the rule, never what it resolved to.
    return problem(
        request,
        status=422,
        slug=f"egress-denied/{exc.reason}",
        title="This URL is not allowed",
        detail=str(exc),
        extra={"reason": str(exc.reason)},
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # registered for this type only
        raise exc
    errors = [{"loc": list(err.get("loc", ())), "msg": str(err.get("msg", ""))} for err in exc.errors()]
    return problem(
        request,
        status=422,
        slug="validation-error",
        title="The request is invalid",
        detail="; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)[:1000],
        extra={"errors": errors},
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # registered for this type only
        raise exc
    slug = _HTTP_SLUGS.get(exc.status_code, "http-error")
    title = slug.replace("-", " ").capitalize()
    # Only our own code sets a detail on these (e.g. the body limit); framework defaults are dropped.
    detail = exc.detail if exc.status_code == 413 else None
    return problem(
        request, status=exc.status_code, slug=slug, title=title, detail=detail, headers=dict(exc.headers or {})
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log_event(
        "unhandled error",
        logging.ERROR,
        **{REQUEST_ID: getattr(request.state, REQUEST_ID, None), DECISION_REASON: "internal-error"},
        error_type=type(exc).__name__,
    )
    return problem(
        request,
        status=500,
        slug="internal-error",
        title="Something went wrong on our side",
        detail="The error has been logged; quote the request id if you contact us.",
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(EgressDenied, _egress_denied)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
