"""Settings: the only module that reads the environment.

Every secret is a ``SecretStr`` so it never lands in a repr, a log line or a response.
Production refuses to start when a required secret is missing or still a placeholder.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["local", "test", "preview", "production"]

# Values that must never reach production (copied from examples or left over from local runs).
MIN_SIGNING_SECRET_LENGTH = 32
_PLACEHOLDERS = frozenset({"", "changeme", "change-me", "secret", "local", "test", "xxx"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    environment: Environment = "local"

    # Postgres as the NOINHERIT login role (never a superuser); transaction pooler in production.
    database_url: SecretStr = SecretStr("")
    db_pool_max_size: int = Field(default=5, ge=1, le=50)
    db_connect_timeout_seconds: float = Field(default=3.0, gt=0)

    # Upstash Redis REST endpoint (locally: the REST bridge in front of a real Redis).
    upstash_redis_rest_url: str = ""
    upstash_redis_rest_token: SecretStr = SecretStr("")
    # A command not answered in time fails, and opens the circuit breaker (shared/redis.py).
    upstash_redis_timeout_seconds: float = Field(default=3.0, gt=0, le=30)

    # Supabase Auth: access tokens are verified with the JWKS (asymmetric keys) or the legacy secret.
    supabase_url: str = ""
    supabase_jwt_secret: SecretStr = SecretStr("")
    supabase_jwks_url: str = ""
    # Server-side Supabase client (team invitations through the Auth admin API). Never sent anywhere else.
    supabase_service_role_key: SecretStr = SecretStr("")
    jwt_audience: str = "authenticated"

    # Signs widget visitor tokens; separate from every other key.
    widget_token_secret: SecretStr = SecretStr("")

    # Connection credentials: AES-GCM keys as "<key_id>:<base64 32 bytes>", comma separated, first one current.
    credential_keys: SecretStr = SecretStr("")

    # Vercel Cron sends "Authorization: Bearer <CRON_SECRET>" to cron paths; they refuse anything else.
    cron_secret: SecretStr = SecretStr("")

    # Models: with no key the offline provider answers from retrieved knowledge.
    openai_api_key: SecretStr = SecretStr("")
    openai_base_url: str = "https://api.openai.com/v1"
    model_timeout_seconds: float = Field(default=20.0, gt=0)
    # An admin key of the same provider organization: read-only use by the usage reconciliation.
    openai_admin_key: SecretStr = SecretStr("")

    stripe_secret_key: SecretStr = SecretStr("")
    # Several secrets during rotation, comma separated.
    stripe_webhook_secrets: SecretStr = SecretStr("")
    stripe_api_base: str = "https://api.stripe.com"
    # The dashboard's origin: Stripe Checkout and the Customer Portal send people back here.
    dashboard_url: str = "http://localhost:3000"

    # Bounds every request body before it is parsed.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    @model_validator(mode="after")
    def _enforce_production_secrets(self) -> Settings:
        if self.environment != "production":
            return self
        required = {
            "DATABASE_URL": self.database_url,
            "UPSTASH_REDIS_REST_TOKEN": self.upstash_redis_rest_token,
            "WIDGET_TOKEN_SECRET": self.widget_token_secret,
            "CREDENTIAL_KEYS": self.credential_keys,
            "CRON_SECRET": self.cron_secret,
            "STRIPE_SECRET_KEY": self.stripe_secret_key,
            "STRIPE_WEBHOOK_SECRETS": self.stripe_webhook_secrets,
        }
        missing = sorted(
            name for name, value in required.items() if value.get_secret_value().strip().lower() in _PLACEHOLDERS
        )
        # Signing keys we generate ourselves must be long enough not to be guessed offline.
        weak = [
            name
            for name, value in (("WIDGET_TOKEN_SECRET", self.widget_token_secret), ("CRON_SECRET", self.cron_secret))
            if name not in missing and len(value.get_secret_value()) < MIN_SIGNING_SECRET_LENGTH
        ]
        missing += [f"{name} (at least {MIN_SIGNING_SECRET_LENGTH} characters)" for name in weak]
        if not (self.supabase_jwks_url or self.supabase_jwt_secret.get_secret_value()):
            missing.append("SUPABASE_JWKS_URL or SUPABASE_JWT_SECRET")
        if not self.upstash_redis_rest_url:
            missing.append("UPSTASH_REDIS_REST_URL")
        if not self.dashboard_url.startswith("https://"):
            missing.append("DASHBOARD_URL (https)")
        if missing:
            # Names only: the values themselves never appear in an error.
            raise ValueError(f"production requires these settings: {', '.join(missing)}")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
