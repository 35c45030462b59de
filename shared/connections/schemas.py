"""Request and response shapes for connections, and the typed rows the service and worker pass around.

Secrets arrive as ``SecretStr`` (never in a repr or a validation error) and leave only as a hint.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints

from shared.cards import Identifier

Kind = Literal["slack_webhook", "discord_webhook", "github", "notion", "webhook"]
DeliverKind = Literal["escalation", "draft", "lead"]
ALL_DELIVER_KINDS: tuple[DeliverKind, ...] = ("escalation", "draft", "lead")

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


def _header_safe(value: SecretStr) -> SecretStr:
    """Tokens and signing secrets travel in HTTP headers, which carry visible ASCII only; anything
    else is refused here (a 422 that never repeats the value) rather than failing mid-request."""
    if not all("!" <= ch <= "~" for ch in value.get_secret_value()):
        raise ValueError("must be visible ASCII characters only, without spaces")
    return value


# Credentials are machine values: a Discord webhook URL holds a numeric id that can pass Luhn, and
# no card scan reads them (shared/cards.py); they are encrypted and never shown again.
SecretUrl = Annotated[SecretStr, Field(min_length=10, max_length=2048), Identifier("a webhook URL")]
Token = Annotated[
    SecretStr, Field(min_length=8, max_length=512), AfterValidator(_header_safe), Identifier("an API token")
]


# GitHub: owner 1-39 characters of letters, digits and inner hyphens; repository names of letters,
# digits, '.', '-' and '_' ("." and ".." are not repositories).
def _not_dot_path(value: str) -> str:
    if value.split("/", 1)[1] in (".", ".."):
        raise ValueError("is not a repository name")
    return value


Repository = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, max_length=140, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}$"
    ),
    AfterValidator(_not_dot_path),
    Identifier("a GitHub repository"),
]


class _CreateBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    org_id: uuid.UUID
    name: Name
    deliver_kinds: Annotated[list[DeliverKind], Field(min_length=1, max_length=3)] = list(ALL_DELIVER_KINDS)


class SlackWebhookCreate(_CreateBase):
    kind: Literal["slack_webhook"]
    webhook_url: SecretUrl


class DiscordWebhookCreate(_CreateBase):
    kind: Literal["discord_webhook"]
    webhook_url: SecretUrl


class GitHubCreate(_CreateBase):
    kind: Literal["github"]
    token: Token
    repository: Repository


class NotionParent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["page", "database"]
    id: uuid.UUID


class NotionCreate(_CreateBase):
    kind: Literal["notion"]
    token: Token
    parent: NotionParent


class WebhookCreate(_CreateBase):
    kind: Literal["webhook"]
    url: SecretUrl
    # Standard Webhooks: "whsec_" + base64 of 24 to 64 random bytes; the customer keeps a copy to verify.
    signing_secret: Annotated[
        SecretStr, Field(min_length=38, max_length=100), AfterValidator(_header_safe), Identifier("a signing secret")
    ]


ConnectionCreate = Annotated[
    SlackWebhookCreate | DiscordWebhookCreate | GitHubCreate | NotionCreate | WebhookCreate,
    Field(discriminator="kind"),
]


class ConnectionOut(BaseModel):
    """What every response carries: metadata and a hint, never the credential."""

    id: uuid.UUID
    org_id: uuid.UUID
    kind: Kind
    name: str
    target: dict[str, Any]
    secret_hint: str | None
    status: Literal["active", "broken"]
    status_reason: str | None
    last_verified_at: datetime | None
    broken_at: datetime | None
    deliver_kinds: list[DeliverKind]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Credential:
    """A decrypted credential. repr hides every value; the fields are registered for log redaction."""

    url: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)

    def values(self) -> list[str]:
        return [v for v in (self.url, self.token, self.secret) if v]


@dataclass(frozen=True, slots=True)
class ReviewItem:
    id: uuid.UUID
    org_id: uuid.UUID
    kind: DeliverKind
    title: str
    payload: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """One claimed delivery with everything needed to send it (credential still sealed)."""

    id: uuid.UUID
    org_id: uuid.UUID
    connection_id: uuid.UUID
    attempts: int
    idempotency_key: uuid.UUID
    created_at: datetime
    kind: Kind
    target: dict[str, Any]
    key_id: str | None
    nonce: bytes | None
    ciphertext: bytes | None
    item: ReviewItem
