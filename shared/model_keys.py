"""Bring your own key: an organization's own OpenAI-compatible API key, managed by its admins.

- Saving (and rotating: saving again) checks the key with a live call before anything is stored:
  ``GET {base_url}/models`` with the key, through the egress guard (the base URL is
  customer-supplied: vetted when saved, and again on every model call by the gateway's guarded
  client). A refused key, an unreachable or non-OpenAI-compatible server: a 422 that says which.
- The key is sealed by the application (AES-GCM, ``shared.crypto``, as connection credentials,
  bound to the organization and to a fresh ``sealed_id``) into ``secrets.model_key_credentials``,
  which only the service role can touch. Responses carry a hint (``…abcd``), never the key.
- ``on_key_failure`` is the organization's choice for when its key starts failing with
  authentication errors: ``refuse`` (default) or ``platform`` (``shared.gateway.keys``).
- Owners and admins only (404 outside the organization, 403 for members); every change is audited.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from shared.audit import record
from shared.auth import Claims
from shared.cards import Identifier
from shared.crypto import get_keyring
from shared.db.session import Connection, Database, as_service, as_user
from shared.egress import check_url, guarded_client
from shared.errors import DomainError, Forbidden, NotFound
from shared.gateway import keys
from shared.gateway.keys import ModelKeyEnvironment
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event, register_secret
from shared.ratelimit import RateLimitRule, enforce

ACTOR: Final = "model-key-api"
OnKeyFailure = Literal["refuse", "platform"]
# Each save makes a live request on the caller's behalf.
KEY_CHECKS = RateLimitRule("model-key-checks", limit=20, window_seconds=60)


class ModelKeyCheckFailed(DomainError):
    status = 422
    type_slug = "model-key-check-failed"
    title = "The key could not be verified"


class ModelKeySave(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID
    # Machine values, not text a person typed: the card scan skips them (shared/cards.py).
    api_key: Annotated[SecretStr, Field(min_length=8, max_length=512), Identifier("an API key")]
    base_url: Annotated[str | None, Field(min_length=8, max_length=2000), Identifier("a URL")] = None
    on_key_failure: OnKeyFailure | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.lower().startswith(("https://", "http://")):
            raise ValueError("must be an https URL, e.g. https://llm.example.com/v1")
        return value


class ModelKeySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID
    on_key_failure: OnKeyFailure


class ModelKeyOut(BaseModel):
    org_id: uuid.UUID
    base_url: str | None
    key_hint: str
    status: Literal["active", "broken"]
    status_reason: str | None
    broken_at: datetime | None
    on_key_failure: OnKeyFailure
    last_verified_at: datetime
    created_at: datetime
    updated_at: datetime

    @field_validator("key_hint")
    @classmethod
    def _ellipsis(cls, value: str) -> str:
        return "…" + value


_ROLE = "select m.role from public.memberships as m where m.org_id = %(org_id)s and m.user_id = (select auth.uid())"
_COLUMNS = (
    "org_id, base_url, key_hint, status, status_reason, broken_at, on_key_failure, last_verified_at, created_at,"
    " updated_at"
)
_READ = f"select {_COLUMNS} from public.model_keys where org_id = %(org_id)s"  # noqa: S608 - constant columns
_LOCK = "select key_hint, base_url, on_key_failure from public.model_keys where org_id = %(org_id)s for update"
_UPSERT = f"""
insert into public.model_keys (org_id, sealed_id, base_url, key_hint, on_key_failure, created_by)
values (%(org_id)s, %(sealed_id)s, %(base_url)s, %(key_hint)s, %(on_key_failure)s, %(user_id)s)
on conflict (org_id) do update
   set sealed_id = excluded.sealed_id, base_url = excluded.base_url, key_hint = excluded.key_hint,
       on_key_failure = excluded.on_key_failure, status = 'active', status_reason = null, broken_at = null,
       last_verified_at = now()
returning {_COLUMNS}
"""  # noqa: S608 - constant columns
_SEAL = """
insert into secrets.model_key_credentials (org_id, key_id, nonce, ciphertext)
values (%(org_id)s, %(key_id)s, %(nonce)s, %(ciphertext)s)
on conflict (org_id) do update
   set key_id = excluded.key_id, nonce = excluded.nonce, ciphertext = excluded.ciphertext, created_at = now()
"""
_SET_FALLBACK = f"""
update public.model_keys set on_key_failure = %(on_key_failure)s where org_id = %(org_id)s
returning {_COLUMNS}
"""  # noqa: S608 - constant columns
_DELETE = "delete from public.model_keys where org_id = %(org_id)s returning key_hint, base_url"


def _user_id(claims: Claims) -> uuid.UUID:
    return uuid.UUID(str(claims["sub"]))


async def _require_admin(db: Database, claims: Claims, org_id: uuid.UUID) -> None:
    async with as_user(db, claims) as conn:
        row = await (await conn.execute(_ROLE, {"org_id": org_id})).fetchone()
    if row is None:
        raise NotFound("No such organization.")
    if row["role"] not in ("owner", "admin"):
        raise Forbidden("Only owners and admins can manage the organization's model key.")


async def check_key(api_key: str, base_url: str, env: ModelKeyEnvironment) -> None:
    """The live check: list the models the key may use. Raises with our own words on failure."""
    await check_url(base_url + "/models", policy=env.policy, resolver=env.resolver)
    try:
        async with guarded_client(policy=env.policy, resolver=env.resolver) as client:
            response = await client.get(base_url + "/models", headers={"Authorization": f"Bearer {api_key}"})
    except httpx.TimeoutException:
        raise ModelKeyCheckFailed("The provider did not answer in time; nothing was saved.") from None
    except httpx.HTTPError:
        raise ModelKeyCheckFailed("The provider could not be reached at this base URL; nothing was saved.") from None
    if response.status_code in (401, 403):
        raise ModelKeyCheckFailed(f"The provider refused this key (HTTP {response.status_code}); nothing was saved.")
    if response.status_code != 200:
        raise ModelKeyCheckFailed(
            f"The provider answered HTTP {response.status_code} when listing models; nothing was saved."
        )
    try:
        listed = response.json()
        ok = isinstance(listed, dict) and isinstance(listed.get("data"), list)
    except ValueError:
        ok = False
    if not ok:
        raise ModelKeyCheckFailed("This base URL does not answer like an OpenAI-compatible API (GET /models).")


async def save(
    db: Database, claims: Claims, body: ModelKeySave, *, env: ModelKeyEnvironment, request_id: str | None
) -> ModelKeyOut:
    api_key = body.api_key.get_secret_value().strip()
    register_secret(api_key)
    await _require_admin(db, claims, body.org_id)
    await enforce(
        KEY_CHECKS, str(body.org_id), detail="Too many key checks for this organization; try again in a minute."
    )
    await check_key(api_key, body.base_url or keys.DEFAULT_BASE_URL, env)

    sealed_id = uuid.uuid4()
    sealed = get_keyring().seal(api_key.encode(), org_id=body.org_id, connection_id=sealed_id)
    async with as_service(db) as conn:
        previous = await (await conn.execute(_LOCK, {"org_id": body.org_id})).fetchone()
        on_key_failure = body.on_key_failure or (previous["on_key_failure"] if previous else "refuse")
        row = await (
            await conn.execute(
                _UPSERT,
                {
                    "org_id": body.org_id,
                    "sealed_id": sealed_id,
                    "base_url": body.base_url,
                    "key_hint": api_key[-4:],
                    "on_key_failure": on_key_failure,
                    "user_id": _user_id(claims),
                },
            )
        ).fetchone()
        await conn.execute(
            _SEAL,
            {"org_id": body.org_id, "key_id": sealed.key_id, "nonce": sealed.nonce, "ciphertext": sealed.ciphertext},
        )
        details: dict[str, Any] = {
            "key_hint": api_key[-4:],
            "base_url": body.base_url,
            "on_key_failure": on_key_failure,
        }
        if previous:
            details |= {"previous_key_hint": previous["key_hint"], "previous_base_url": previous["base_url"]}
        await _audit(
            conn, body.org_id, "model_key.rotated" if previous else "model_key.set", claims, request_id, details
        )
    keys.forget(body.org_id)
    _log("organization model key saved", body.org_id, request_id, "model-key-verified")
    return ModelKeyOut.model_validate(dict(row or {}))


async def read(db: Database, claims: Claims, org_id: uuid.UUID) -> ModelKeyOut:
    await _require_admin(db, claims, org_id)
    async with as_user(db, claims) as conn:
        row = await (await conn.execute(_READ, {"org_id": org_id})).fetchone()
    if row is None:
        raise NotFound("This organization uses the platform's model key; it has not stored its own.")
    return ModelKeyOut.model_validate(dict(row))


async def update_settings(
    db: Database, claims: Claims, body: ModelKeySettings, *, request_id: str | None
) -> ModelKeyOut:
    await _require_admin(db, claims, body.org_id)
    async with as_service(db) as conn:
        previous = await (await conn.execute(_LOCK, {"org_id": body.org_id})).fetchone()
        if previous is None:
            raise NotFound("This organization has not stored a model key of its own.")
        row = await (await conn.execute(_SET_FALLBACK, dict(body))).fetchone()
        if previous["on_key_failure"] != body.on_key_failure:
            await _audit(
                conn,
                body.org_id,
                "model_key.fallback_changed",
                claims,
                request_id,
                {"from": previous["on_key_failure"], "to": body.on_key_failure},
            )
    keys.forget(body.org_id)
    return ModelKeyOut.model_validate(dict(row or {}))


async def remove(db: Database, claims: Claims, org_id: uuid.UUID, *, request_id: str | None) -> None:
    await _require_admin(db, claims, org_id)
    async with as_service(db) as conn:
        removed = await (await conn.execute(_DELETE, {"org_id": org_id})).fetchone()
        if removed is None:
            raise NotFound("This organization has not stored a model key of its own.")
        await _audit(
            conn,
            org_id,
            "model_key.removed",
            claims,
            request_id,
            {"key_hint": removed["key_hint"], "base_url": removed["base_url"]},
        )
    keys.forget(org_id)


async def _audit(
    conn: Connection, org_id: uuid.UUID, action: str, claims: Claims, request_id: str | None, details: dict[str, Any]
) -> None:
    await record(
        conn,
        org_id=org_id,
        action=action,
        actor=ACTOR,
        actor_user_id=_user_id(claims),
        target_type="model_key",
        target_id=str(org_id),
        details=details,
        request_id=request_id,
    )


def _log(message: str, org_id: uuid.UUID, request_id: str | None, reason: str) -> None:
    log_event(message, logging.INFO, **{ORG_ID: str(org_id), REQUEST_ID: request_id, DECISION_REASON: reason})
