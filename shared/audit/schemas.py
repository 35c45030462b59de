"""Request shapes of the audit-log API."""

from __future__ import annotations

import uuid

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.audit.export import ExportFormat


class ExportQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    org_id: uuid.UUID
    start: AwareDatetime = Field(alias="from")
    end: AwareDatetime | None = Field(default=None, alias="to")
    format: ExportFormat = "ndjson"
