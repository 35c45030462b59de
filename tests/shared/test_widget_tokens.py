"""Visitor tokens from the attacker's side: every way to get a conversation without being given its token."""

from __future__ import annotations

import time
import uuid
import warnings
from typing import Any

import jwt
import pytest

from shared.settings import get_settings
from shared.widget import visitor_tokens
from shared.widget.visitor_tokens import AUDIENCE, ISSUER, TOKEN_PREFIX, TOKEN_TTL, issue, verify

CONVERSATION = uuid.uuid4()
AGENT = uuid.uuid4()


def secret() -> bytes:
    return visitor_tokens.signing_key()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "aud": AUDIENCE,
        "iss": ISSUER,
        "sub": "v_visitor",
        "cid": str(CONVERSATION),
        "aid": str(AGENT),
        "gen": 3,
        "iat": now,
        "exp": now + 600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(payload: dict[str, Any], *, key: str | bytes | None = None, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # HS512 with a 32-byte key
        return TOKEN_PREFIX + jwt.encode(payload, key if key is not None else secret(), algorithm=algorithm)


class TestIssue:
    def test_a_token_names_its_conversation_agent_and_visitor(self) -> None:
        token, expires_at = issue(
            conversation_id=CONVERSATION, agent_id=AGENT, visitor_id="v_1", generation=2, now=1_000
        )

        assert token.startswith(TOKEN_PREFIX)
        assert expires_at == 1_000 + int(TOKEN_TTL.total_seconds())
        decoded = jwt.decode(
            token.removeprefix(TOKEN_PREFIX),
            secret(),
            algorithms=["HS256"],
            audience=AUDIENCE,
            options={"verify_exp": False},
        )
        assert decoded["cid"] == str(CONVERSATION)
        assert decoded["aid"] == str(AGENT)
        assert decoded["sub"] == "v_1"
        assert decoded["gen"] == 2

    def test_a_fresh_token_verifies(self) -> None:
        token, expires_at = issue(conversation_id=CONVERSATION, agent_id=AGENT, visitor_id="v_1", generation=4)

        verified = verify(token)

        assert verified == visitor_tokens.VisitorClaims(CONVERSATION, AGENT, "v_1", expires_at, 4)

    def test_visitor_ids_are_random(self) -> None:
        assert len({visitor_tokens.new_visitor_id() for _ in range(100)}) == 100


class TestVerifyRefuses:
    @pytest.mark.parametrize(
        ("name", "token"),
        [
            ("expired", lambda: signed(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 60))),
            ("another secret", lambda: signed(claims(), key="another-secret-of-sufficient-length-000000")),
            (
                "the raw secret instead of the derived key",
                lambda: signed(claims(), key=get_settings().widget_token_secret.get_secret_value()),
            ),
            ("another audience", lambda: signed(claims(aud="authenticated"))),
            ("another issuer", lambda: signed(claims(iss="supabase"))),
            ("no conversation", lambda: signed(claims(cid=None))),
            ("no agent", lambda: signed(claims(aid=None))),
            ("no visitor", lambda: signed(claims(sub=None))),
            ("no expiry", lambda: signed(claims(exp=None))),
            ("no generation", lambda: signed(claims(gen=None))),
            ("a generation that is not a number", lambda: signed(claims(gen="3"))),
            ("a generation of zero", lambda: signed(claims(gen=0))),
            ("a generation that is a boolean", lambda: signed(claims(gen=True))),
            ("not a uuid", lambda: signed(claims(cid="1 or 1=1"))),
            ("alg none", lambda: TOKEN_PREFIX + jwt.encode(claims(), None, algorithm="none")),  # type: ignore[arg-type]
            ("HS512 with our secret", lambda: signed(claims(), algorithm="HS512")),
            ("no prefix", lambda: signed(claims()).removeprefix(TOKEN_PREFIX)),
            ("a dashboard access token", lambda: "eyJhbGciOiJIUzI1NiJ9.e30.sig"),
            ("oversized", lambda: signed(claims(pad="x" * 2000))),
            ("garbage", lambda: TOKEN_PREFIX + "...."),
            ("empty", lambda: TOKEN_PREFIX),
        ],
    )
    def test_with_one_answer_for_every_failure(self, name: str, token: Any) -> None:
        assert verify(token()) is None, name

    def test_a_tampered_payload(self) -> None:
        token = signed(claims())
        header, payload, signature = token.removeprefix(TOKEN_PREFIX).split(".")
        forged_payload = jwt.utils.base64url_encode(
            jwt.utils.base64url_decode(payload).replace(str(CONVERSATION).encode(), str(uuid.uuid4()).encode())
        ).decode()

        assert verify(f"{TOKEN_PREFIX}{header}.{forged_payload}.{signature}") is None

    def test_without_a_configured_secret_nothing_is_issued(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WIDGET_TOKEN_SECRET", "")
        get_settings.cache_clear()
        try:
            with pytest.raises(RuntimeError, match="WIDGET_TOKEN_SECRET"):
                issue(conversation_id=CONVERSATION, agent_id=AGENT, visitor_id="v_1", generation=1)
        finally:
            monkeypatch.undo()
            get_settings.cache_clear()
