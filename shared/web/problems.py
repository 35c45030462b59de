"""RFC 9457 problem documents: the one place errors become responses.

Validation errors report ``loc`` and ``msg`` but never the submitted ``input`` (a mistyped token
must not be echoed back); a ``loc`` can hold a key the client chose, so card numbers are removed
from it. Anything unexpected becomes an opaque 500 with only a request id, rendered by the app
factory's middleware (``shared/web/app.py``) so that it keeps every header.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.cards import redact_pans
from shared.egress import EgressDenied
from shared.errors import DomainError
from shared.logs import REQUEST_ID

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


def _safe_loc_part(part: Any) -> str | int:
    """A ``loc`` step as it may be shown: a key the client chose loses any card number and any
    character that is not valid Unicode, and long keys are cut."""
    if isinstance(part, int):
        return part
    text = redact_pans(str(part)).encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= 100 else text[:100] + "…"


def _validation_problem(request: Request, errors: list[dict[str, Any]]) -> JSONResponse:
    return problem(
        request,
        status=422,
        slug="validation-error",
        title="The request is invalid",
        detail="; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)[:1000],
        extra={"errors": errors},
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # registered for this type only
        raise exc
    errors = [
        {"loc": [_safe_loc_part(p) for p in err.get("loc", ())], "msg": str(err.get("msg", ""))} for err in exc.errors()
    ]
    return _validation_problem(request, errors)


# Why FastAPI could not read a body it then calls "There was an error parsing the body" (a 400).
_UNREADABLE_BODY = {
    UnicodeDecodeError: "JSON text must be UTF-8, UTF-16 or UTF-32; the body has bytes that are not",
    RecursionError: "JSON is nested too deeply to be read",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # registered for this type only
        raise exc
    if exc.status_code == 400 and exc.__cause__ is not None:
        # The body parser failed on the body itself: that is invalid input, said like any other.
        reason = _UNREADABLE_BODY.get(type(exc.__cause__), "The body could not be read as JSON")
        return _validation_problem(request, [{"loc": ["body"], "msg": reason}])
    slug = _HTTP_SLUGS.get(exc.status_code, "http-error")
    title = slug.replace("-", " ").capitalize()
    # Only our own code sets a detail on these (e.g. the body limit); framework defaults are dropped.
    detail = exc.detail if exc.status_code == 413 else None
    return problem(
        request, status=exc.status_code, slug=slug, title=title, detail=detail, headers=dict(exc.headers or {})
    )


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(EgressDenied, _egress_denied)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
