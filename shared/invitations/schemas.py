"""Request and response shapes of the invitations API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.cards import Identifier

Role = Literal["owner", "admin", "member"]


class InvitationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    org_id: uuid.UUID
    # Supabase Auth validates the address again; this only keeps obvious junk out.
    email: Annotated[
        str,
        Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
        Identifier("an email address"),  # a phone number as the local part is an address, not a card
    ]
    role: Role = "member"

    @field_validator("email")
    @classmethod
    def _lowercase(cls, value: str) -> str:
        return value.strip().lower()


class InvitationOut(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    email: str
    role: Role
    status: Literal["pending", "accepted", "revoked", "expired"]
    invited_by: uuid.UUID | None
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class InvitationList(BaseModel):
    invitations: list[InvitationOut]
