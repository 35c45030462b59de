"""Create, re-verify and delete connections.

Each operation walks the same three steps, in separate short transactions so no database
connection is held while a provider answers:

1. *as the user* (RLS decides): the caller must see the organization or connection (else 404) and be
   an owner or admin of it (else 403);
2. the live call, through the egress guard, with nothing stored yet;
3. *as the service*: the write that no client may make (connections are inserted only by the
   server; credentials live in ``secrets``, which only the service role can touch) and its
   audit-log row, in one transaction.

Deletion is the exception: owners and admins may delete straight from the dashboard, so the API
deletes as the user too, and a trigger writes the audit row for every path.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Final

import httpx

from shared.auth import Claims
from shared.connections import providers
from shared.connections.errors import ConnectionVerificationFailed, ProviderFailure, ProviderUnavailable
from shared.connections.providers import DestinationRefused, ProviderEnvironment
from shared.connections.schemas import (
    ConnectionCreate,
    ConnectionOut,
    Credential,
    DiscordWebhookCreate,
    GitHubCreate,
    Kind,
    NotionCreate,
    SlackWebhookCreate,
)
from shared.crypto import CredentialUnreadable, Sealed, get_keyring
from shared.db.session import Connection, Database, as_service, as_user, jsonb
from shared.errors import DependencyUnavailable, Forbidden, NotFound
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event, register_secret
from shared.ratelimit import RateLimitRule, enforce

ACTOR_API: Final = "connections-api"


class EgressRefused(ConnectionVerificationFailed):
    type_slug = "egress-denied"
    title = "This destination is not allowed"


# ---------------------------------------------------------------------------------------------
# Credentials: in memory only between the request (or the sealed row) and the provider.
# ---------------------------------------------------------------------------------------------


def protect(credential: Credential) -> None:
    """Register every part of a credential for log redaction, before anything can log it."""
    for value in credential.values():
        register_secret(value)
        if value.startswith(("https://", "http://")):
            url = httpx.URL(value)
            register_secret(url.raw_path.decode("ascii", "replace"))
            register_secret(url.path.rsplit("/", 1)[-1])  # the token part of a Slack or Discord webhook path


def credential_from_body(body: ConnectionCreate) -> tuple[Credential, dict[str, Any]]:
    if isinstance(body, SlackWebhookCreate | DiscordWebhookCreate):
        return Credential(url=body.webhook_url.get_secret_value().strip()), {}
    if isinstance(body, GitHubCreate):
        return Credential(token=body.token.get_secret_value().strip()), {"repository": body.repository}
    if isinstance(body, NotionCreate):
        return Credential(token=body.token.get_secret_value().strip()), {
            "parent_type": body.parent.type,
            "parent_id": str(body.parent.id),
        }
    return Credential(
        url=body.url.get_secret_value().strip(), secret=body.signing_secret.get_secret_value().strip()
    ), {}


def seal_credential(credential: Credential, *, org_id: uuid.UUID, connection_id: uuid.UUID) -> Sealed:
    document = {
        k: v for k, v in (("url", credential.url), ("token", credential.token), ("secret", credential.secret)) if v
    }
    return get_keyring().seal(json.dumps(document).encode(), org_id=org_id, connection_id=connection_id)


def open_credential(sealed: Sealed, *, org_id: uuid.UUID, connection_id: uuid.UUID) -> Credential:
    """Service path only: the sealed row comes from the secrets schema, which no client role can read."""
    document = json.loads(get_keyring().open(sealed, org_id=org_id, connection_id=connection_id))
    credential = Credential(url=document.get("url"), token=document.get("token"), secret=document.get("secret"))
    protect(credential)
    return credential


# ---------------------------------------------------------------------------------------------
# SQL.
# ---------------------------------------------------------------------------------------------

_MEMBER_ROLE = """
select m.role
  from public.memberships as m
 where m.org_id = %(org_id)s
   and m.user_id = (select auth.uid())
"""

_VISIBLE_CONNECTION = """
select c.*, c.org_id = any (array(select private.user_admin_org_ids())) as can_manage
  from public.connections as c
 where c.id = %(id)s
"""

_INSERT_CONNECTION = """
insert into public.connections
  (id, org_id, kind, name, target, secret_hint, status, last_verified_at, deliver_kinds, created_by)
values
  (%(id)s, %(org_id)s, %(kind)s, %(name)s, %(target)s, %(secret_hint)s, 'active', now(), %(deliver_kinds)s,
   %(created_by)s)
returning *
"""

_INSERT_CREDENTIAL = """
insert into secrets.connection_credentials (connection_id, org_id, key_id, nonce, ciphertext)
values (%(connection_id)s, %(org_id)s, %(key_id)s, %(nonce)s, %(ciphertext)s)
"""

_SEALED_CREDENTIAL = """
select k.key_id, k.nonce, k.ciphertext
  from secrets.connection_credentials as k
 where k.connection_id = %(connection_id)s
   and k.org_id = %(org_id)s
"""

_MARK_ACTIVE = """
update public.connections
   set status = 'active', status_reason = null, broken_at = null, last_verified_at = now(), target = %(target)s
 where id = %(id)s
returning *
"""

_MARK_BROKEN = """
update public.connections
   set status = 'broken',
       status_reason = %(reason)s,
       broken_at = case when status = 'broken' then broken_at else now() end,
       last_verified_at = now()
 where id = %(id)s
returning *
"""

_INSERT_AUDIT = """
insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details, request_id)
values (%(org_id)s, %(actor_user_id)s, %(actor)s, %(action)s, %(target_type)s, %(target_id)s, %(details)s,
        %(request_id)s)
"""

_SET_REQUEST_ID = "select set_config('hiredhands.request_id', %(request_id)s, true)"

_DELETE_CONNECTION = "delete from public.connections where id = %(id)s returning id"


async def write_audit(
    conn: Connection,
    *,
    org_id: uuid.UUID,
    action: str,
    connection_id: uuid.UUID | None,
    actor: str,
    actor_user_id: uuid.UUID | None,
    details: Mapping[str, Any],
    request_id: str | None,
) -> None:
    await conn.execute(
        _INSERT_AUDIT,
        {
            "org_id": org_id,
            "actor_user_id": actor_user_id,
            "actor": actor,
            "action": action,
            "target_type": "connection" if connection_id else "connection_credentials",
            "target_id": str(connection_id) if connection_id else None,
            "details": jsonb(dict(details)),
            "request_id": request_id,
        },
    )


# Each verification makes live requests to a provider or a customer's endpoint on the caller's behalf:
# bound how many an organization can trigger, so the dashboard is not a request cannon.
OUTBOUND_CHECKS = RateLimitRule("connection-checks", limit=20, window_seconds=60)
_TOO_MANY_CHECKS = "Too many connection checks for this organization; try again in a minute."


def _user_id(claims: Claims) -> uuid.UUID:
    return uuid.UUID(str(claims["sub"]))


async def _require_manager(db: Database, claims: Claims, connection_id: uuid.UUID) -> dict[str, Any]:
    async with as_user(db, claims) as conn:
        row = await (await conn.execute(_VISIBLE_CONNECTION, {"id": connection_id})).fetchone()
    if row is None:
        raise NotFound("No such connection.")
    if not row["can_manage"]:
        raise Forbidden("Only owners and admins of the organization can manage its connections.")
    return dict(row)


def _refusal(exc: ProviderFailure) -> ConnectionVerificationFailed:
    if isinstance(exc, DestinationRefused):
        return EgressRefused(exc.message)
    return ConnectionVerificationFailed(exc.message)


def _log(message: str, *, org_id: uuid.UUID, request_id: str | None, reason: str, **fields: Any) -> None:
    log_event(message, logging.INFO, **{ORG_ID: str(org_id), REQUEST_ID: request_id, DECISION_REASON: reason}, **fields)


# ---------------------------------------------------------------------------------------------
# Operations.
# ---------------------------------------------------------------------------------------------


async def create_connection(
    db: Database, claims: Claims, body: ConnectionCreate, *, env: ProviderEnvironment, request_id: str | None
) -> ConnectionOut:
    credential, target_input = credential_from_body(body)
    protect(credential)
    async with as_user(db, claims) as conn:
        member = await (await conn.execute(_MEMBER_ROLE, {"org_id": body.org_id})).fetchone()
    if member is None:
        raise NotFound("No such organization.")
    if member["role"] not in ("owner", "admin"):
        raise Forbidden("Only owners and admins of the organization can add connections.")
    await enforce(OUTBOUND_CHECKS, str(body.org_id), detail=_TOO_MANY_CHECKS)

    kind: Kind = body.kind
    try:
        async with env.client() as client:
            verified = await providers.verify(kind, credential, target_input, client=client, env=env)
    except ProviderFailure as exc:
        _log("connection refused", org_id=body.org_id, request_id=request_id, reason="verification-failed", kind=kind)
        raise _refusal(exc) from None

    connection_id = uuid.uuid4()
    sealed = seal_credential(credential, org_id=body.org_id, connection_id=connection_id)
    async with as_service(db) as conn:
        row = await (
            await conn.execute(
                _INSERT_CONNECTION,
                {
                    "id": connection_id,
                    "org_id": body.org_id,
                    "kind": kind,
                    "name": body.name,
                    "target": jsonb(verified.target),
                    "secret_hint": providers.secret_hint(credential, kind),
                    "deliver_kinds": list(dict.fromkeys(body.deliver_kinds)),
                    "created_by": _user_id(claims),
                },
            )
        ).fetchone()
        await conn.execute(
            _INSERT_CREDENTIAL,
            {
                "connection_id": connection_id,
                "org_id": body.org_id,
                "key_id": sealed.key_id,
                "nonce": sealed.nonce,
                "ciphertext": sealed.ciphertext,
            },
        )
        await write_audit(
            conn,
            org_id=body.org_id,
            action="connection.created",
            connection_id=connection_id,
            actor=ACTOR_API,
            actor_user_id=_user_id(claims),
            details={"kind": kind, "name": body.name, "deliver_kinds": list(dict.fromkeys(body.deliver_kinds))},
            request_id=request_id,
        )
    _log("connection created", org_id=body.org_id, request_id=request_id, reason="verified", kind=kind)
    return _out(row)


async def load_credential(conn: Connection, *, org_id: uuid.UUID, connection_id: uuid.UUID) -> Credential:
    row = await (await conn.execute(_SEALED_CREDENTIAL, {"connection_id": connection_id, "org_id": org_id})).fetchone()
    if row is None:
        raise CredentialUnreadable("the connection has no stored credential")
    sealed = Sealed(key_id=row["key_id"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"]))
    return open_credential(sealed, org_id=org_id, connection_id=connection_id)


async def verify_connection(
    db: Database, claims: Claims, connection_id: uuid.UUID, *, env: ProviderEnvironment, request_id: str | None
) -> ConnectionOut:
    current = await _require_manager(db, claims, connection_id)
    await enforce(OUTBOUND_CHECKS, str(current["org_id"]), detail=_TOO_MANY_CHECKS)
    org_id: uuid.UUID = current["org_id"]
    kind: Kind = current["kind"]
    try:
        async with as_service(db) as conn:
            credential = await load_credential(conn, org_id=org_id, connection_id=connection_id)
    except CredentialUnreadable:
        _log("connection credential unreadable", org_id=org_id, request_id=request_id, reason="credential-unreadable")
        raise DependencyUnavailable("The connection's stored credential cannot be read right now.") from None

    try:
        async with env.client() as client:
            verified = await providers.verify(kind, credential, current["target"], client=client, env=env)
    except ProviderUnavailable as exc:
        # Nothing learned about the credential: the status stays as it was.
        async with as_service(db) as conn:
            await _audit_verify(conn, current, claims, request_id, {"result": "unavailable", "reason": exc.message})
        raise DependencyUnavailable(exc.message) from None
    except ProviderFailure as exc:
        async with as_service(db) as conn:
            row = await (await conn.execute(_MARK_BROKEN, {"id": connection_id, "reason": exc.message})).fetchone()
            details = {"result": "broken", "reason": exc.message, "http_status": exc.status}
            await _audit_verify(conn, current, claims, request_id, details, broke=current["status"] == "active")
        _log("connection broken", org_id=org_id, request_id=request_id, reason="verification-failed", kind=kind)
        return _out(row)
    async with as_service(db) as conn:
        row = await (
            await conn.execute(_MARK_ACTIVE, {"id": connection_id, "target": jsonb(verified.target)})
        ).fetchone()
        await _audit_verify(conn, current, claims, request_id, {"result": "active"})
    return _out(row)


async def _audit_verify(
    conn: Connection,
    current: Mapping[str, Any],
    claims: Claims,
    request_id: str | None,
    details: Mapping[str, Any],
    *,
    broke: bool = False,
) -> None:
    await write_audit(
        conn,
        org_id=current["org_id"],
        action="connection.broken" if broke else "connection.verified",
        connection_id=current["id"],
        actor=ACTOR_API,
        actor_user_id=_user_id(claims),
        details=details,
        request_id=request_id,
    )


def _out(row: Mapping[str, Any] | None) -> ConnectionOut:
    if row is None:  # deleted while we were verifying it
        raise NotFound("No such connection.")
    return ConnectionOut.model_validate(dict(row))


async def delete_connection(db: Database, claims: Claims, connection_id: uuid.UUID, *, request_id: str | None) -> None:
    async with as_user(db, claims) as conn:
        await conn.execute(_SET_REQUEST_ID, {"request_id": request_id or ""})
        deleted = await (await conn.execute(_DELETE_CONNECTION, {"id": connection_id})).fetchone()
        if deleted is None:
            visible = await (await conn.execute(_VISIBLE_CONNECTION, {"id": connection_id})).fetchone()
            if visible is None:
                raise NotFound("No such connection.")
            raise Forbidden("Only owners and admins of the organization can delete its connections.")
