"""Access tokens are verified as Supabase issues them: JWKS (asymmetric) and the legacy secret."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from shared.auth import verify_access_token
from shared.errors import Unauthorized
from shared.settings import get_settings
from tests.factories import access_token

USER = {"id": uuid.uuid4(), "email": "someone@example.test"}


@pytest.fixture
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks_server(signing_key: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A loopback stand-in for https://<project>.supabase.co/auth/v1/.well-known/jwks.json."""
    jwk = json.loads(ECAlgorithm.to_jwk(signing_key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "key-1", "alg": "ES256", "use": "sig"}]}).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/auth/v1/.well-known/jwks.json"
    monkeypatch.setenv("SUPABASE_JWKS_URL", url)
    get_settings.cache_clear()
    yield url
    server.shutdown()
    server.server_close()
    monkeypatch.delenv("SUPABASE_JWKS_URL")
    get_settings.cache_clear()


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims = {"sub": str(USER["id"]), "aud": "authenticated", "role": "authenticated", "iat": now, "exp": now + 600}
    return {**claims, **overrides}


class TestLegacySharedSecret:
    async def test_valid_token_returns_its_claims(self) -> None:
        claims = await verify_access_token(access_token(USER))
        assert claims["sub"] == str(USER["id"])

    async def test_expired_token_is_refused(self) -> None:
        token = access_token(USER, exp=int(time.time()) - 120)
        with pytest.raises(Unauthorized, match="expired"):
            await verify_access_token(token)

    async def test_wrong_audience_is_refused(self) -> None:
        with pytest.raises(Unauthorized, match="not meant for this API"):
            await verify_access_token(access_token(USER, aud="someone-else"))

    async def test_token_signed_with_another_secret_is_refused(self) -> None:
        token = jwt.encode(_claims(), "a-different-secret-of-sufficient-length-000", algorithm="HS256")
        with pytest.raises(Unauthorized, match="invalid"):
            await verify_access_token(token)

    async def test_unsigned_token_is_refused(self) -> None:
        token = jwt.encode(_claims(), None, algorithm="none")
        with pytest.raises(Unauthorized, match="algorithm"):
            await verify_access_token(token)

    async def test_anon_key_is_not_a_user_session(self) -> None:
        with pytest.raises(Unauthorized, match="signed-in user"):
            await verify_access_token(access_token(USER, role="anon"))

    async def test_garbage_is_refused(self) -> None:
        with pytest.raises(Unauthorized, match="malformed"):
            await verify_access_token("not-a-jwt")

    async def test_token_without_expiry_is_refused(self) -> None:
        claims = _claims()
        del claims["exp"]
        token = jwt.encode(claims, get_settings().supabase_jwt_secret.get_secret_value(), algorithm="HS256")
        with pytest.raises(Unauthorized):
            await verify_access_token(token)


@pytest.mark.usefixtures("jwks_server")
class TestAsymmetricKeysFromJwks:
    async def test_es256_token_verifies_against_the_jwks(self, signing_key: ec.EllipticCurvePrivateKey) -> None:
        token = jwt.encode(_claims(), signing_key, algorithm="ES256", headers={"kid": "key-1"})
        assert (await verify_access_token(token))["sub"] == str(USER["id"])

    async def test_token_from_an_unknown_key_is_refused(self) -> None:
        other = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(_claims(), other, algorithm="ES256", headers={"kid": "key-2"})
        with pytest.raises(Unauthorized, match="signing key is unknown"):
            await verify_access_token(token)

    async def test_forged_signature_with_known_kid_is_refused(self) -> None:
        other = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(_claims(), other, algorithm="ES256", headers={"kid": "key-1"})
        with pytest.raises(Unauthorized, match="invalid"):
            await verify_access_token(token)
