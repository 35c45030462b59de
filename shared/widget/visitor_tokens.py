"""Visitor tokens: proof that the bearer opened a conversation, bound to it and to its agent.

The first message of a conversation returns a token; every later message must carry it
(``Authorization: Bearer hh_vt_...``). Knowing a conversation id is therefore worth nothing: the id
is only honoured inside a token signed with ``WIDGET_TOKEN_SECRET`` that names the same agent.

Format: ``hh_vt_`` + a JWT (HS256, PyJWT) with ``aud`` ``hiredhands:widget-visitor``, ``iss``
``hiredhands``, ``sub`` the visitor id, ``cid`` the conversation id, ``aid`` the agent id, and
``gen`` the conversation's token generation, ``iat``/``exp``, signed with a key derived from the
secret for this purpose only. Every reply carries a fresh token, so a conversation stays open while
the visitor keeps talking and expires ``TOKEN_TTL`` after the last message. A newer token
supersedes older ones: the chat accepts only the current generation and the one before (checked
against the conversation's row, docs/widget.md), and closing the conversation revokes them all.
The prefix lets the log redaction recognise the token anywhere.
Only HS256 is accepted (no ``none``, no key confusion), every claim is required, and any failure
is the same ``None``: the caller cannot be told which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from shared.settings import get_settings

TOKEN_PREFIX = "hh_vt_"  # noqa: S105 - a prefix, not a secret
AUDIENCE = "hiredhands:widget-visitor"
ISSUER = "hiredhands"
ALGORITHM = "HS256"
TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_CHARS = 1024
_REQUIRED = ["aud", "iss", "sub", "cid", "aid", "gen", "iat", "exp"]
_KEY_PURPOSE = b"hiredhands widget visitor token v1"


@dataclass(frozen=True, slots=True)
class VisitorClaims:
    conversation_id: UUID
    agent_id: UUID
    visitor_id: str
    expires_at: int
    """Unix seconds."""
    generation: int
    """The conversation's token generation when the token was issued."""


def signing_key() -> bytes:
    """HMAC-SHA256(WIDGET_TOKEN_SECRET, purpose): 32 bytes whatever the secret's length, and only for this use."""
    secret = get_settings().widget_token_secret.get_secret_value()
    if not secret:
        # Production refuses to start without it (shared.settings); anywhere else this is a setup error.
        raise RuntimeError("WIDGET_TOKEN_SECRET is not set")
    return hmac.new(secret.encode(), _KEY_PURPOSE, hashlib.sha256).digest()


def new_visitor_id() -> str:
    return "v_" + uuid.uuid4().hex


def issue(
    *, conversation_id: UUID, agent_id: UUID, visitor_id: str, generation: int, now: float | None = None
) -> tuple[str, int]:
    """A token for this conversation at this token generation, and its expiry (unix seconds)."""
    issued_at = int(now if now is not None else time.time())
    expires_at = issued_at + int(TOKEN_TTL.total_seconds())
    claims = {
        "aud": AUDIENCE,
        "iss": ISSUER,
        "sub": visitor_id,
        "cid": str(conversation_id),
        "aid": str(agent_id),
        "gen": generation,
        "iat": issued_at,
        "exp": expires_at,
    }
    import jwt  # loaded by the first chat, not by config or preflight requests

    return TOKEN_PREFIX + jwt.encode(claims, signing_key(), algorithm=ALGORITHM), expires_at


def verify(token: str) -> VisitorClaims | None:
    """The token's claims when it is well formed, signed by us, unexpired and for the widget; else ``None``.

    The agent binding is checked by the caller against the agent the key resolved to.
    """
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
        return None
    import jwt

    try:
        claims = jwt.decode(
            token.removeprefix(TOKEN_PREFIX),
            signing_key(),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": _REQUIRED},
        )
        return VisitorClaims(
            conversation_id=UUID(str(claims["cid"])),
            agent_id=UUID(str(claims["aid"])),
            visitor_id=str(claims["sub"]),
            expires_at=int(claims["exp"]),
            generation=_generation(claims["gen"]),
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        return None


def _generation(value: object) -> int:
    if type(value) is not int or not 1 <= value <= 2**31 - 1:
        raise ValueError("gen")
    return value
