"""Verify dashboard access tokens exactly as Supabase Auth issues them.

Asymmetric signing keys (ES256/RS256) come from the project's JWKS; the legacy shared secret
(HS256) still works while a project migrates. Algorithms are fixed per key type, so a token
cannot choose its own verification (no ``alg: none``, no HS256 signed with a public key).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from shared.errors import Unauthorized
from shared.settings import get_settings

if TYPE_CHECKING:
    import jwt

Claims = dict[str, Any]

_ASYMMETRIC = ("ES256", "RS256", "EdDSA")
_REQUIRED = ["exp", "sub", "aud", "role"]
_LEEWAY_SECONDS = 30


@lru_cache
def _jwks_client(url: str) -> jwt.PyJWKClient:
    import jwt

    # Keys are cached for an hour and refetched when an unknown kid appears (key rotation).
    return jwt.PyJWKClient(url, cache_keys=True, lifespan=3600, timeout=3)


async def verify_access_token(token: str) -> Claims:
    import jwt  # loaded by the first authenticated request, not at function start

    settings = get_settings()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthorized("The access token is malformed.") from exc
    alg = header.get("alg")
    key: Any
    try:
        if alg in _ASYMMETRIC and settings.supabase_jwks_url:
            jwks = _jwks_client(settings.supabase_jwks_url)
            # PyJWKClient fetches with urllib; keep that off the event loop.
            signing_key = await asyncio.to_thread(jwks.get_signing_key_from_jwt, token)
            key, algorithms = signing_key.key, [alg]
        elif alg == "HS256" and settings.supabase_jwt_secret.get_secret_value():
            key, algorithms = settings.supabase_jwt_secret.get_secret_value(), ["HS256"]
        else:
            raise Unauthorized("The access token is signed with an algorithm this project does not accept.")
        claims: Claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=settings.jwt_audience,
            leeway=_LEEWAY_SECONDS,
            options={"require": _REQUIRED},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("The access token has expired.") from exc
    except jwt.InvalidAudienceError as exc:
        raise Unauthorized("The access token is not meant for this API.") from exc
    except jwt.PyJWKClientError as exc:
        raise Unauthorized("The access token's signing key is unknown.") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("The access token is invalid.") from exc
    if claims.get("role") != "authenticated":
        # anon and service_role keys are not user sessions.
        raise Unauthorized("A signed-in user's access token is required.")
    return claims
