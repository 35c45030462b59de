"""Invite, list and revoke.

Rules, each checked *as the user* before anything is sent or written:

- only owners and admins of the organization invite, list and revoke (someone outside it gets
  404, a plain member 403);
- never to a role above the inviter's own (owner > admin > member), and an admin cannot revoke an
  owner's invitation;
- one pending invitation per address and organization; an address that is already a member is a
  409.

Then: an address whose Supabase Auth user has signed in before is added at once (the invitation
is recorded as accepted); any other address gets Supabase's invite email through the admin API
and a pending invitation, which becomes a membership when the invitee signs in (a trigger on
``auth.users``, see the migration), unless it expired (``INVITATION_TTL``) or was revoked first.
Every step writes an audit row; membership changes are audited by a trigger on every path.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any, Final

from shared.audit import record
from shared.auth import Claims
from shared.db.session import Connection, Database, as_service, as_user
from shared.errors import Conflict, Forbidden, NotFound
from shared.invitations import auth_admin
from shared.invitations.schemas import InvitationCreate, InvitationList, InvitationOut, Role
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.ratelimit import RateLimitRule, enforce
from shared.settings import get_settings

ACTOR: Final = "invitations-api"
INVITATION_TTL: Final = timedelta(days=7)
RANK: Final[dict[str, int]] = {"member": 0, "admin": 1, "owner": 2}
# Each invitation may send an email on our behalf: bound how many an organization can send.
INVITES = RateLimitRule("invitations", limit=30, window_seconds=3600)

_CALLER_ROLE = """
select m.role from public.memberships as m where m.org_id = %(org_id)s and m.user_id = (select auth.uid())
"""

_STATUS = "case when i.status = 'pending' and i.expires_at <= now() then 'expired' else i.status end as status"

_LIST = f"""
select i.id, i.org_id, i.email, i.role, {_STATUS}, i.invited_by, i.expires_at, i.accepted_at, i.revoked_at,
       i.created_at
  from public.invitations as i
 where i.org_id = %(org_id)s
 order by i.created_at desc
 limit 500
"""  # noqa: S608 - a constant fragment, no input

_VISIBLE = f"""
select i.id, i.org_id, i.email, i.role, {_STATUS}, i.invited_by, i.expires_at, i.accepted_at, i.revoked_at,
       i.created_at,
       (select m.role from public.memberships as m where m.org_id = i.org_id and m.user_id = (select auth.uid()))
         as caller_role
  from public.invitations as i
 where i.id = %(id)s
"""  # noqa: S608 - a constant fragment, no input

_AUTH_USER = "select id, has_signed_in from private.auth_user_by_email(%(email)s)"
_IS_MEMBER = "select 1 from public.memberships where org_id = %(org_id)s and user_id = %(user_id)s"
_EXPIRE_STALE = """
update public.invitations set status = 'expired'
 where org_id = %(org_id)s and email = %(email)s and status = 'pending' and expires_at <= now()
"""
_PENDING = "select 1 from public.invitations where org_id = %(org_id)s and email = %(email)s and status = 'pending'"
_SET_REQUEST_ID = "select set_config('hiredhands.request_id', %(request_id)s, true)"

_INSERT = """
insert into public.invitations (org_id, email, role, status, invited_by, invited_user_id, expires_at, accepted_at)
values (%(org_id)s, %(email)s, %(role)s, %(status)s, %(invited_by)s, %(invited_user_id)s, now() + %(ttl)s,
        case when %(status)s = 'accepted' then now() end)
returning id, org_id, email, role, status, invited_by, expires_at, accepted_at, revoked_at, created_at
"""
_ADD_MEMBER = "insert into public.memberships (org_id, user_id, role) values (%(org_id)s, %(user_id)s, %(role)s)"

_REVOKE = """
update public.invitations
   set status = 'revoked', revoked_at = now(), revoked_by = %(revoked_by)s
 where id = %(id)s and status = 'pending' and expires_at > now()
returning id, org_id, email, role, status, invited_by, expires_at, accepted_at, revoked_at, created_at
"""


def _user_id(claims: Claims) -> uuid.UUID:
    return uuid.UUID(str(claims["sub"]))


async def _require_inviter(db: Database, claims: Claims, org_id: uuid.UUID) -> str:
    async with as_user(db, claims) as conn:
        row = await (await conn.execute(_CALLER_ROLE, {"org_id": org_id})).fetchone()
    if row is None:
        raise NotFound("No such organization.")
    role: str = row["role"]
    if role not in ("owner", "admin"):
        raise Forbidden("Only owners and admins of the organization can manage invitations.")
    return role


async def invite(db: Database, claims: Claims, body: InvitationCreate, *, request_id: str | None) -> InvitationOut:
    inviter_role = await _require_inviter(db, claims, body.org_id)
    if RANK[body.role] > RANK[inviter_role]:
        raise Forbidden(f"An {inviter_role} cannot invite someone as {body.role}: never above your own role.")
    await enforce(INVITES, str(body.org_id), detail="Too many invitations from this organization; try again later.")

    params = {"org_id": body.org_id, "email": body.email}
    async with as_service(db) as conn:
        user = await (await conn.execute(_AUTH_USER, params)).fetchone()
        if user and await (await conn.execute(_IS_MEMBER, {**params, "user_id": user["id"]})).fetchone():
            raise Conflict("This person is already a member of the organization.")
        await conn.execute(_EXPIRE_STALE, params)
        if await (await conn.execute(_PENDING, params)).fetchone():
            raise Conflict("This address already has a pending invitation; revoke it to invite again.")

    if user and user["has_signed_in"]:
        # An existing account: added now, no email needed.
        async with as_service(db) as conn:
            invitation = await _insert(
                conn, body, claims, status="accepted", invited_user_id=user["id"], request_id=request_id
            )
            await conn.execute(_ADD_MEMBER, {**params, "user_id": user["id"], "role": body.role})
            await _audit(conn, invitation, claims, "invitation.accepted", request_id, {"via": "existing-account"})
        _log("invitation: existing account added", body.org_id, request_id, "member-added")
        return invitation

    settings = get_settings()
    invited = await auth_admin.invite_user_by_email(
        body.email, redirect_to=settings.dashboard_url, data={"invited_to_org": str(body.org_id)}
    )
    async with as_service(db) as conn:
        invitation = await _insert(
            conn, body, claims, status="pending", invited_user_id=invited.id, request_id=request_id
        )
    _log("invitation sent", body.org_id, request_id, "invitation-sent")
    return invitation


async def _insert(
    conn: Connection,
    body: InvitationCreate,
    claims: Claims,
    *,
    status: str,
    invited_user_id: uuid.UUID,
    request_id: str | None,
) -> InvitationOut:
    await conn.execute(_SET_REQUEST_ID, {"request_id": request_id or ""})
    row = await (
        await conn.execute(
            _INSERT,
            {
                "org_id": body.org_id,
                "email": body.email,
                "role": body.role,
                "status": status,
                "invited_by": _user_id(claims),
                "invited_user_id": invited_user_id,
                "ttl": INVITATION_TTL,
            },
        )
    ).fetchone()
    assert row is not None  # noqa: S101 - insert ... returning always returns the row
    invitation = InvitationOut.model_validate(dict(row))
    await _audit(
        conn,
        invitation,
        claims,
        "invitation.created",
        request_id,
        {"delivery": "email" if status == "pending" else "existing-account"},
    )
    return invitation


async def _audit(
    conn: Connection,
    invitation: InvitationOut,
    claims: Claims,
    action: str,
    request_id: str | None,
    extra: dict[str, Any],
) -> None:
    await record(
        conn,
        org_id=invitation.org_id,
        action=action,
        actor=ACTOR,
        actor_user_id=_user_id(claims),
        target_type="invitation",
        target_id=str(invitation.id),
        details={"email": invitation.email, "role": invitation.role, **extra},
        request_id=request_id,
    )


async def list_invitations(db: Database, claims: Claims, org_id: uuid.UUID) -> InvitationList:
    await _require_inviter(db, claims, org_id)
    async with as_user(db, claims) as conn:
        rows = await (await conn.execute(_LIST, {"org_id": org_id})).fetchall()
    return InvitationList(invitations=[InvitationOut.model_validate(dict(r)) for r in rows])


async def revoke(db: Database, claims: Claims, invitation_id: uuid.UUID, *, request_id: str | None) -> InvitationOut:
    async with as_user(db, claims) as conn:
        row = await (await conn.execute(_VISIBLE, {"id": invitation_id})).fetchone()
    if row is None:  # RLS shows invitations to owners and admins of their organization only
        raise NotFound("No such invitation.")
    caller_role: Role = row["caller_role"]
    if RANK[row["role"]] > RANK[caller_role]:
        raise Forbidden(f"An {caller_role} cannot revoke an invitation as {row['role']}.")
    async with as_service(db) as conn:
        revoked = await (await conn.execute(_REVOKE, {"id": invitation_id, "revoked_by": _user_id(claims)})).fetchone()
        if revoked is None:
            raise Conflict(f"This invitation is {row['status']}, not pending: there is nothing to revoke.")
        invitation = InvitationOut.model_validate(dict(revoked))
        await _audit(conn, invitation, claims, "invitation.revoked", request_id, {})
    return invitation


def _log(message: str, org_id: uuid.UUID, request_id: str | None, reason: str) -> None:
    log_event(message, logging.INFO, **{ORG_ID: str(org_id), REQUEST_ID: request_id, DECISION_REASON: reason})
