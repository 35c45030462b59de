"""Write one audit-log row from a server path.

Client paths that change security-relevant rows straight from the dashboard (memberships,
connection deletion) are audited by triggers in the database instead, so no path can skip them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from shared.db.session import Connection, jsonb

_INSERT = """
insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details, request_id)
values (%(org_id)s, %(actor_user_id)s, %(actor)s, %(action)s, %(target_type)s, %(target_id)s, %(details)s,
        %(request_id)s)
"""


async def record(
    conn: Connection,
    *,
    org_id: uuid.UUID,
    action: str,
    actor: str,
    actor_user_id: uuid.UUID | None,
    target_type: str | None = None,
    target_id: str | None = None,
    details: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> None:
    """Insert the row on ``conn`` (a service transaction: only service_role may insert)."""
    await conn.execute(
        _INSERT,
        {
            "org_id": org_id,
            "actor_user_id": actor_user_id,
            "actor": actor,
            "action": action,
            "target_type": target_type,
            "target_id": target_id,
            "details": jsonb(dict(details or {})),
            "request_id": request_id,
        },
    )
