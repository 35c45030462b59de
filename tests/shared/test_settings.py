"""Production refuses to start without its secrets; secrets never show in a repr or an error."""

from __future__ import annotations

import base64
import secrets

import pytest
from pydantic import ValidationError

from shared.settings import Settings

STRONG = secrets.token_urlsafe(32)
PRODUCTION = {
    "environment": "production",
    "database_url": "postgresql://api_login:" + STRONG + "@pooler.example:6543/postgres",
    "upstash_redis_rest_url": "https://eu1-example.upstash.io",
    "upstash_redis_rest_token": "upstash-" + STRONG,
    "supabase_jwks_url": "https://project.supabase.co/auth/v1/.well-known/jwks.json",
    "widget_token_secret": STRONG,
    "cron_secret": "cron-" + STRONG,
    "credential_keys": "k1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
    "stripe_secret_key": "sk_live_" + STRONG,
    "stripe_webhook_secrets": "whsec_" + STRONG,
    "dashboard_url": "https://app.hiredhands.dev",
}


def test_a_complete_production_configuration_starts() -> None:
    assert Settings(**PRODUCTION).environment == "production"


@pytest.mark.parametrize(
    "name", ["database_url", "widget_token_secret", "credential_keys", "stripe_webhook_secrets", "cron_secret"]
)
def test_production_refuses_to_start_without_a_secret(name: str) -> None:
    with pytest.raises(ValidationError, match=name.upper()):
        Settings(**{**PRODUCTION, name: ""})


@pytest.mark.parametrize("placeholder", ["changeme", "secret", " test "])
def test_production_refuses_placeholders(placeholder: str) -> None:
    with pytest.raises(ValidationError, match="STRIPE_SECRET_KEY"):
        Settings(**{**PRODUCTION, "stripe_secret_key": placeholder})


def test_production_refuses_a_short_signing_secret() -> None:
    with pytest.raises(ValidationError, match=r"WIDGET_TOKEN_SECRET \(at least 32"):
        Settings(**{**PRODUCTION, "widget_token_secret": "short-but-not-empty"})


def test_production_needs_a_way_to_verify_access_tokens() -> None:
    with pytest.raises(ValidationError, match="SUPABASE_JWKS_URL or SUPABASE_JWT_SECRET"):
        Settings(**{**PRODUCTION, "supabase_jwks_url": "", "supabase_jwt_secret": ""})


def test_the_error_names_settings_but_never_shows_a_value() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**{**PRODUCTION, "widget_token_secret": "short-but-not-empty", "cron_secret": ""})
    text = str(caught.value)
    for value in (STRONG, "short-but-not-empty", PRODUCTION["stripe_secret_key"]):
        assert value not in text


def test_secrets_never_show_in_a_repr() -> None:
    text = repr(Settings(**PRODUCTION)) + str(Settings(**PRODUCTION).model_dump())
    assert STRONG not in text


def test_local_and_test_need_no_secrets() -> None:
    assert Settings(environment="local").environment == "local"
