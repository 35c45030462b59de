"""The README's deploy section lists exactly the settings the code reads, and marks exactly the ones
production refuses to start without."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\s*\| `([A-Z_]+)` \|([^|]*)\|", re.MULTILINE)
ROWS = {name: marker.strip() for name, marker in ROW.findall(README.read_text())}
REQUIRED = {name for name, marker in ROWS.items() if marker == "✔"}
ONE_OF = {name for name, marker in ROWS.items() if marker.startswith("✔ one of")}

PRODUCTION = {
    "ENVIRONMENT": "production",
    "DATABASE_URL": "postgresql://authenticator:pw@db.example:6543/postgres",
    "UPSTASH_REDIS_REST_URL": "https://redis.example",
    "UPSTASH_REDIS_REST_TOKEN": "upstash-token-0123456789",
    "SUPABASE_JWKS_URL": "https://project.example/auth/v1/.well-known/jwks.json",
    "WIDGET_TOKEN_SECRET": "w" * 40,
    "CREDENTIAL_KEYS": "k1:" + base64.b64encode(b"\1" * 32).decode(),
    "CRON_SECRET": "c" * 40,
    "STRIPE_SECRET_KEY": "sk_live_0123456789",
    "STRIPE_WEBHOOK_SECRETS": "whsec_0123456789",
    "DASHBOARD_URL": "https://app.example",
}


def production(monkeypatch: pytest.MonkeyPatch, values: dict[str, str]) -> Settings:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_the_readme_lists_every_setting_and_nothing_else() -> None:
    assert set(ROWS) == {name.upper() for name in Settings.model_fields}


def test_the_marked_settings_are_enough_for_production(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(PRODUCTION) == REQUIRED | {"SUPABASE_JWKS_URL"}
    assert {"SUPABASE_JWKS_URL", "SUPABASE_JWT_SECRET"} == ONE_OF
    assert production(monkeypatch, PRODUCTION).environment == "production"


@pytest.mark.parametrize("name", sorted(REQUIRED - {"ENVIRONMENT"}))
def test_production_refuses_to_start_without_each_marked_setting(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    with pytest.raises(ValidationError, match=name):
        production(monkeypatch, {k: v for k, v in PRODUCTION.items() if k != name})


def test_production_needs_one_of_the_token_verification_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    without = {k: v for k, v in PRODUCTION.items() if k != "SUPABASE_JWKS_URL"}
    with pytest.raises(ValidationError, match="SUPABASE_JWKS_URL or SUPABASE_JWT_SECRET"):
        production(monkeypatch, without)
    assert production(monkeypatch, {**without, "SUPABASE_JWT_SECRET": "j" * 40}).environment == "production"
