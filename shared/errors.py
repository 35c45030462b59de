"""Typed domain errors. No web framework here: shared/web/problems.py renders them once.

Each error carries an HTTP status, a stable ``type`` slug (the problem document's type and the
log's ``decision_reason``) and a title; ``detail`` is a message safe to show the caller.
"""

from __future__ import annotations

from typing import ClassVar


class DomainError(Exception):
    status: ClassVar[int] = 400
    type_slug: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.detail = detail or self.title
        self.headers = headers or {}
        super().__init__(self.detail)


class BadRequest(DomainError):
    pass


class Unauthorized(DomainError):
    status = 401
    type_slug = "unauthorized"
    title = "Authentication required"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class Forbidden(DomainError):
    status = 403
    type_slug = "forbidden"
    title = "Not allowed"


class NotFound(DomainError):
    status = 404
    type_slug = "not-found"
    title = "Not found"


class Conflict(DomainError):
    status = 409
    type_slug = "conflict"
    title = "Conflict"


class PayloadTooLarge(DomainError):
    status = 413
    type_slug = "payload-too-large"
    title = "Request body too large"


class Unprocessable(DomainError):
    status = 422
    type_slug = "unprocessable"
    title = "The request could not be processed"


class RateLimited(DomainError):
    status = 429
    type_slug = "rate-limited"
    title = "Too many requests"

    def __init__(self, retry_after_seconds: int, detail: str | None = None) -> None:
        self.retry_after_seconds = max(1, int(retry_after_seconds))
        super().__init__(detail, headers={"Retry-After": str(self.retry_after_seconds)})


class BudgetExhausted(DomainError):
    status = 402
    type_slug = "budget-exhausted"
    title = "Monthly model budget exhausted"


class DependencyUnavailable(DomainError):
    status = 503
    type_slug = "dependency-unavailable"
    title = "A dependency is unavailable"

    def __init__(self, detail: str | None = None, *, retry_after_seconds: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_seconds)})


class ModelUnavailable(DomainError):
    """The model timed out or failed; nothing was charged. Retry later or hand over to a person."""

    status = 503
    type_slug = "model-unavailable"
    title = "The model is unavailable"

    def __init__(self, detail: str | None = None, *, retry_after_seconds: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_seconds)})


class InternalError(DomainError):
    """What an unexpected exception becomes: opaque, with nothing of the exception in it."""

    status = 500
    type_slug = "internal-error"
    title = "Something went wrong on our side"

    def __init__(self) -> None:
        super().__init__("The error has been logged; quote the request id if you contact us.")
