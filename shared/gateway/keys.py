"""Which key pays for a model call: the platform's, or the organization's own (bring your own key).

``select(db, org_id)`` runs first in every gateway call. An organization with an active key of its
own gets a provider configuration with that key and base URL, whose HTTP client is the egress
guard (the base URL is customer-supplied: its resolved address is checked on every call). An
organization without one gets the platform's configuration (or none: the offline provider).

A key that the provider refuses (HTTP 401 or 403) during a call is marked ``broken`` at once
(``watch``), with an audit row; from the next call on, the organization's ``on_key_failure``
setting decides: ``refuse`` (the default: the call fails with ``ModelKeyBroken``, nothing is sent
anywhere else) or ``platform`` (the platform key pays, and the usage rows say so). An admin fixes it
by saving a working key.

The organization's key row is cached in the process for ``CACHE_SECONDS`` (sealed, as stored),
with one lookup in flight per organization, so a busy organization costs one query per instance
every few seconds instead of one per call. Changes made through this instance take effect at once;
on other instances within ``CACHE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

from shared.crypto import CredentialUnreadable, Sealed, get_keyring
from shared.db.session import Database, as_service, run_as_service
from shared.egress import EgressPolicy, Resolver
from shared.errors import ModelUnavailable
from shared.gateway import provider
from shared.logs import DECISION_REASON, ORG_ID, log_event, register_secret
from shared.metering import KeySource
from shared.settings import get_settings

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
AUTH_FAILURES: Final = frozenset({"model-status-401", "model-status-403"})


class ModelKeyBroken(ModelUnavailable):
    type_slug = "model-key-broken"
    title = "The organization's model key is not working"


@dataclass(frozen=True, slots=True)
class ModelKeyEnvironment:
    """Where customer-chosen base URLs may go. Production uses ``PRODUCTION``; only code (tests)
    builds another one, to reach loopback fakes. No setting or environment variable changes it."""

    policy: EgressPolicy
    resolver: Resolver | None = None


# Embeddings of 2,048 texts come back as about 16 MB of base64: room for that, and no more.
PRODUCTION: Final = ModelKeyEnvironment(
    EgressPolicy(purpose="model-provider", allowed_schemes=frozenset({"https"}), max_response_bytes=32 * 1024 * 1024)
)
model_key_environment: ContextVar[ModelKeyEnvironment] = ContextVar("model_key_environment", default=PRODUCTION)


def get_model_key_environment() -> ModelKeyEnvironment:
    """FastAPI dependency and the gateway's source alike (tests set it in code)."""
    return model_key_environment.get()


@dataclass(frozen=True, slots=True)
class Selection:
    config: provider.ProviderConfig | None
    source: KeySource
    org_id: uuid.UUID


_SELECT = """
select k.sealed_id, k.base_url, k.status, k.on_key_failure, c.key_id, c.nonce, c.ciphertext
  from public.model_keys as k
  join secrets.model_key_credentials as c on c.org_id = k.org_id
 where k.org_id = %(org_id)s
"""

_MARK_BROKEN = """
update public.model_keys
   set status = 'broken', status_reason = %(reason)s, broken_at = now()
 where org_id = %(org_id)s and sealed_id = %(sealed_id)s and status = 'active'
returning org_id
"""

_AUDIT_BROKEN = """
insert into public.audit_log (org_id, actor, action, target_type, target_id, details, request_id)
values (%(org_id)s, 'model-gateway', 'model_key.broken', 'model_key', %(org_id)s::text,
        jsonb_build_object('reason', %(reason)s::text, 'on_key_failure', %(on_key_failure)s::text), %(request_id)s)
"""


def _platform(org_id: uuid.UUID) -> Selection:
    config = provider.config_from(get_settings())
    return Selection(config, "platform" if config is not None else "none", org_id)


def open_key(sealed: Sealed, *, org_id: uuid.UUID, sealed_id: uuid.UUID) -> str:
    key = get_keyring().open(sealed, org_id=org_id, connection_id=sealed_id).decode()
    register_secret(key)
    return key


CACHE_SECONDS: Final = 10.0
_cache: dict[uuid.UUID, tuple[float, dict[str, Any] | None]] = {}
_inflight: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[uuid.UUID, asyncio.Future[dict[str, Any] | None]]
] = weakref.WeakKeyDictionary()


def forget(org_id: uuid.UUID) -> None:
    """Drop the cached row (after this instance changed it)."""
    _cache.pop(org_id, None)


async def _stored(db: Database, org_id: uuid.UUID) -> dict[str, Any] | None:
    cached = _cache.get(org_id)
    if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
        return cached[1]
    pending = _inflight.setdefault(asyncio.get_running_loop(), {})
    waiting = pending.get(org_id)
    if waiting is not None:
        return await asyncio.shield(waiting)
    future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
    pending[org_id] = future
    try:
        rows = await run_as_service(db, _SELECT, {"org_id": org_id})
        row = dict(rows[0]) if rows else None
        _cache[org_id] = (time.monotonic(), row)
        future.set_result(row)
        return row
    except asyncio.CancelledError:
        future.cancel()
        raise
    except Exception as exc:
        future.set_exception(exc)
        future.exception()  # retrieved here, so an unawaited future does not warn
        raise
    finally:
        pending.pop(org_id, None)


async def select(db: Database, org_id: uuid.UUID) -> Selection:
    row = await _stored(db, org_id)
    if row is None:
        return _platform(org_id)
    if row["status"] != "active":
        if row["on_key_failure"] == "platform":
            return _platform(org_id)
        log_event(
            "organization key broken: call refused",
            logging.WARNING,
            **{ORG_ID: str(org_id), DECISION_REASON: "model-key-broken"},
        )
        raise ModelKeyBroken("This organization's own model key stopped working; an admin needs to save a working key.")
    sealed = Sealed(key_id=row["key_id"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"]))
    try:
        api_key = open_key(sealed, org_id=org_id, sealed_id=row["sealed_id"])
    except CredentialUnreadable:
        log_event(
            "organization key unreadable",
            logging.ERROR,
            **{ORG_ID: str(org_id), DECISION_REASON: "model-key-unreadable"},
        )
        raise ModelKeyBroken("This organization's model key cannot be read right now.") from None
    environment = model_key_environment.get()
    settings = get_settings()
    config = provider.ProviderConfig(
        api_key,
        row["base_url"] or DEFAULT_BASE_URL,
        settings.model_timeout_seconds,
        egress=environment.policy,
        resolver=environment.resolver,
        key_ref=row["sealed_id"],
    )
    return Selection(config, "organization", org_id)


@contextlib.asynccontextmanager
async def watch(db: Database, selection: Selection, *, request_id: str) -> AsyncIterator[None]:
    """Around a provider call: an organization key refused by its provider is marked broken."""
    try:
        yield
    except provider.ProviderFailure as failure:
        await note_failure(db, selection, failure, request_id=request_id)
        raise


async def note_failure(
    db: Database, selection: Selection, failure: provider.ProviderFailure, *, request_id: str
) -> None:
    """A failed call: if the provider refused the organization's own key, mark the key broken."""
    if selection.source == "organization" and selection.config and failure.reason in AUTH_FAILURES:
        await _mark_broken(db, selection, failure.reason, request_id)


async def _mark_broken(db: Database, selection: Selection, reason: str, request_id: str) -> None:
    assert selection.config is not None  # noqa: S101 - checked by the caller
    marked = None
    try:
        async with as_service(db) as conn:
            marked = await (
                await conn.execute(
                    _MARK_BROKEN,
                    {"org_id": selection.org_id, "sealed_id": selection.config.key_ref, "reason": reason},
                )
            ).fetchone()
            if marked is not None:  # only the first failing call writes the row
                setting = await (
                    await conn.execute(
                        "select on_key_failure from public.model_keys where org_id = %(org_id)s",
                        {"org_id": selection.org_id},
                    )
                ).fetchone()
                await conn.execute(
                    _AUDIT_BROKEN,
                    {
                        "org_id": selection.org_id,
                        "reason": reason,
                        "request_id": request_id,
                        "on_key_failure": setting["on_key_failure"] if setting else None,
                    },
                )
    except Exception as exc:  # the call's own failure is what the caller must see
        forget(selection.org_id)
        log_event(
            "could not mark the organization key broken",
            logging.ERROR,
            **{ORG_ID: str(selection.org_id), DECISION_REASON: "model-key-mark-failed"},
            error_type=type(exc).__name__,
        )
        return
    forget(selection.org_id)
    if marked is None:  # another call marked it first
        return
    log_event(
        "organization key refused by its provider: marked broken",
        logging.WARNING,
        **{ORG_ID: str(selection.org_id), DECISION_REASON: "model-key-broken"},
    )
