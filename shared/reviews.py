"""The review queue's way in: escalations (with a drafted reply) and captured leads.

Items are built and validated here, then inserted by the server (``service_role``) in the caller's
transaction. The database does the rest (``*_create_review_queue.sql``, with the first status
renamed by ``*_rename_review_status_open_to_pending.sql``): every item enters as ``pending`` and a
trigger writes its first status-history row; members work the queue from the dashboard, and each
status change is checked and recorded in SQL.

A lead is stored only with a contact the team can use: a syntactically valid email address and/or
a phone number of 7 to 15 digits. A tool call whose details are all invalid creates nothing (and
the caller logs ``lead-invalid``): a queue item nobody can act on is noise. Free text (names,
summaries, drafts) is clipped to fixed lengths so one item cannot carry megabytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from shared.db.errors import map_db_errors
from shared.db.session import Connection, jsonb
from shared.gateway import CAPTURE_LEAD, ESCALATE, ESCALATION_REASONS, ToolCall

if TYPE_CHECKING:
    from psycopg.types.json import Jsonb

Kind = Literal["escalation", "draft", "lead"]

MAX_TITLE_CHARS = 120
MAX_SUMMARY_CHARS = 1000
MAX_DRAFT_CHARS = 4000
MAX_NAME_CHARS = 200
MAX_NOTE_CHARS = 1000
MAX_EMAIL_CHARS = 254

# RFC 5321 sizes, a dotted domain with a letter TLD; deliberately stricter than RFC 5322.
_EMAIL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_PHONE_CHARS = re.compile(r"\+?[0-9 ().\-/]+")

ESCALATION_TITLES = {
    "visitor_requested_human": "Visitor asked for a person",
    "cannot_answer": "The agent could not answer",
    "complaint": "Unhappy visitor",
    "model_unavailable": "The agent failed to answer",
    "other": "Needs a person",
}


@dataclass(frozen=True, slots=True)
class NewReviewItem:
    kind: Kind
    title: str
    payload: dict[str, Any]


def clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def valid_email(value: object) -> str | None:
    """The address with its domain lowercased, or ``None``."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if len(value) > MAX_EMAIL_CHARS or not _EMAIL.fullmatch(value):
        return None
    local, _, domain = value.rpartition("@")
    if len(local) > 64:
        return None
    return f"{local}@{domain.lower()}"


def valid_phone(value: object) -> str | None:
    """The number as ``+digits`` (international) or ``digits``, or ``None``."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not _PHONE_CHARS.fullmatch(value):
        return None
    digits = re.sub(r"\D", "", value)
    if not 7 <= len(digits) <= 15:
        return None
    return ("+" if value.startswith("+") else "") + digits


def _text(value: object, limit: int) -> str:
    return clip(value, limit) if isinstance(value, str) else ""


def escalation(*, reason: object, summary: object, draft_reply: object) -> NewReviewItem:
    """An escalation for the team, with the reply the agent would draft (may be empty)."""
    chosen = reason if isinstance(reason, str) and reason in ESCALATION_TITLES else "other"
    summary_text = _text(summary, MAX_SUMMARY_CHARS)
    title = ESCALATION_TITLES[chosen] + (f": {summary_text}" if summary_text else "")
    return NewReviewItem(
        kind="escalation",
        title=clip(title, MAX_TITLE_CHARS),
        payload={
            "reason": chosen,
            "summary": summary_text,
            "draft_reply": _text(draft_reply, MAX_DRAFT_CHARS),
        },
    )


def lead(*, email: object, phone: object, name: object, note: object) -> NewReviewItem | None:
    """A lead with at least one usable contact; ``None`` when there is none."""
    valid = {"email": valid_email(email), "phone": valid_phone(phone)}
    if valid["email"] is None and valid["phone"] is None:
        return None
    name_text = _text(name, MAX_NAME_CHARS)
    who = name_text or valid["email"] or valid["phone"] or ""
    return NewReviewItem(
        kind="lead",
        title=clip(f"New lead: {who}", MAX_TITLE_CHARS),
        payload={**valid, "name": name_text or None, "note": _text(note, MAX_NOTE_CHARS) or None},
    )


def from_tool_call(call: ToolCall) -> NewReviewItem | None:
    """The item a widget tool call asks for; ``None`` for another tool or a lead with no valid contact."""
    args: Mapping[str, Any] = call.arguments
    if call.name == ESCALATE:
        reason = args.get("reason")
        return escalation(
            reason=reason if reason in ESCALATION_REASONS else "other",
            summary=args.get("summary"),
            draft_reply=args.get("draft_reply"),
        )
    if call.name == CAPTURE_LEAD:
        return lead(email=args.get("email"), phone=args.get("phone"), name=args.get("name"), note=args.get("note"))
    return None


def as_records(items: Sequence[NewReviewItem]) -> Jsonb:
    """The items as one JSON array, for statements that insert them with ``jsonb_to_recordset``."""
    return jsonb([asdict(item) for item in items])


_INSERT = """
insert into public.review_items (org_id, agent_id, conversation_id, kind, title, payload)
select %(org_id)s, %(agent_id)s, %(conversation_id)s, i.kind, i.title, i.payload
  from rows from (jsonb_to_recordset(%(items)s) as (kind text, title text, payload jsonb))
       with ordinality as i(kind, title, payload, n)
 order by i.n
returning id
"""


async def create_review_items(
    conn: Connection,
    *,
    org_id: UUID,
    agent_id: UUID | None,
    conversation_id: UUID | None,
    items: Sequence[NewReviewItem],
) -> list[UUID]:
    """Insert ``items`` (status ``pending``; the trigger writes their history) and return their ids, in order."""
    if not items:
        return []
    params = {"org_id": org_id, "agent_id": agent_id, "conversation_id": conversation_id, "items": as_records(items)}
    with map_db_errors():
        cur = await conn.execute(_INSERT, params)
        rows = await cur.fetchall()
    return [row["id"] for row in rows]
