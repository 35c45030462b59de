"""Supabase Auth's admin API, through the ``supabase`` package's server-side client.

The client authenticates with the service-role key (``SUPABASE_SERVICE_ROLE_KEY``), which never
leaves the server. It is created per call (invitations are rare; the SDK's HTTP client belongs to
the running event loop) and closed after it. The SDK is imported here, inside the functions, so
a function that never invites never loads it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from shared.errors import DependencyUnavailable, DomainError
from shared.logs import register_secret
from shared.settings import get_settings


class InviteRefused(DomainError):
    status = 422
    type_slug = "invitation-refused"
    title = "Supabase Auth refused the invitation"


@dataclass(frozen=True)
class InvitedUser:
    id: uuid.UUID
    email: str


async def _client() -> Any:
    from supabase import AsyncClientOptions, acreate_client

    settings = get_settings()
    key = settings.supabase_service_role_key.get_secret_value()
    if not settings.supabase_url or not key:
        raise DependencyUnavailable("Invitations are not configured on this server.")
    register_secret(key)
    options = AsyncClientOptions(auto_refresh_token=False, persist_session=False)
    return await acreate_client(settings.supabase_url, key, options=options)


async def invite_user_by_email(email: str, *, redirect_to: str, data: dict[str, Any]) -> InvitedUser:
    """Supabase sends its invite email; the answer is the (new or still unconfirmed) user."""
    from supabase_auth.errors import AuthApiError, AuthError

    client = await _client()
    try:
        response = await client.auth.admin.invite_user_by_email(
            email, options={"redirect_to": redirect_to, "data": data}
        )
    except AuthApiError as exc:
        # Our words only: Supabase's message can echo the address or configuration details.
        if exc.status == 429:
            raise DependencyUnavailable("Supabase Auth is rate limiting invite emails; try again later.") from None
        if exc.status >= 500:
            raise DependencyUnavailable("Supabase Auth is unavailable; try again shortly.") from None
        if exc.code == "email_exists":
            raise InviteRefused("This address already has an account; it was not invited again.") from None
        raise InviteRefused(f"Supabase Auth refused to invite this address (HTTP {exc.status}).") from None
    except AuthError:
        raise DependencyUnavailable("Supabase Auth could not be reached; try again shortly.") from None
    finally:
        await client.auth.admin.close()
        await client.auth.close()
    user = response.user
    if user is None or not user.id:
        raise DependencyUnavailable("Supabase Auth answered the invitation without a user.")
    return InvitedUser(id=uuid.UUID(str(user.id)), email=str(user.email or email))
