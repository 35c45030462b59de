"""Headers every answer to the current request carries, however the request ends: a success, a
problem document, or an unexpected failure rendered by the app factory.

``create_app``'s middleware opens one set per request and adds whatever is in it to the response it
sends. Code that decides such a header adds it as soon as it decides (the widget adds its CORS
headers once the origin is checked), so an error raised afterwards, expected or not, still carries
them and a browser can read it. No web framework here: the domain may call ``add_answer_headers``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

_answer_headers: ContextVar[dict[str, str] | None] = ContextVar("answer_headers", default=None)


def add_answer_headers(headers: Mapping[str, str]) -> None:
    """Every answer to the current request carries ``headers`` (outside a request: nothing happens)."""
    current = _answer_headers.get()
    if current is not None:
        current.update(headers)


@contextmanager
def answer_headers_scope() -> Iterator[dict[str, str]]:
    """A fresh set for one request; the middleware reads it when the response starts."""
    headers: dict[str, str] = {}
    token = _answer_headers.set(headers)
    try:
        yield headers
    finally:
        _answer_headers.reset(token)
