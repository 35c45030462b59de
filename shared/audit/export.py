"""Audit-log export: an organization's rows for a time range, as NDJSON or CSV, streamed.

- Only owners and admins of the organization (404 outside it, 403 for members); every page is
  read *as the user*, so row-level security is the wall for the export too.
- Keyset pages of ``PAGE_ROWS`` rows in ``(created_at, id)`` order, each its own short
  transaction: no connection is held between pages and memory does not grow with the log. The
  database renders each row as its line and the lines are joined as received, so no row becomes a
  Python object. The next page is read while the current one is sent: at most two in memory.
- Integrity: the file is hashed as it is written (SHA-256 over every byte, header included).
  After each full page a checkpoint line carries the hash of everything before it, and the last
  line, the trailer, carries the row count and the hash of everything before it. A changed byte
  breaks every later checkpoint; a cut file has no trailer. ``python -m shared.audit.verify``
  checks a file (stdlib only).
- Anchoring: the export writes ``audit_log.export_started`` before the first byte and
  ``audit_log.exported`` (row count and final hash) before the trailer, in the append-only log. A
  file whose hashes were recomputed after an edit still verifies on its own, but its hash no longer
  matches that event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from shared.audit.log import record
from shared.auth import Claims
from shared.db.session import Database, as_service, as_user
from shared.errors import Forbidden, NotFound, Unprocessable
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.ratelimit import RateLimitRule, enforce

if TYPE_CHECKING:
    from psycopg.pq.abc import PGresult

FORMAT_VERSION: Final = "hiredhands-audit-export/v1"
PAGE_ROWS: Final = 5000
ACTOR: Final = "audit-export-api"
ExportFormat = Literal["ndjson", "csv"]
CSV_COLUMNS: Final = (
    "id",
    "created_at",
    "actor",
    "actor_user_id",
    "action",
    "target_type",
    "target_id",
    "details",
    "request_id",
)

# An export reads the whole range; bound how often an organization can ask for one.
EXPORTS = RateLimitRule("audit-exports", limit=20, window_seconds=3600)

# The database's clock bounds the range, so a skewed server clock cannot reach past the rows that exist.
_MEMBER_ROLE = """
select m.role, clock_timestamp() as now
  from public.memberships as m
 where m.org_id = %(org_id)s and m.user_id = (select auth.uid())
"""

_UTC = "select set_config('timezone', 'UTC', true)"

# One page: each row rendered by the database as one line (UTF-8 bytes, whatever the connection's
# encoding), in (created_at, id) order, with the key to resume after. One line per result row rather
# than one aggregated block per page: building and sending a block of megabytes costs the database
# more (fresh memory for every page) than the client spends joining the lines (measured).
_PAGE = """
select convert_to({line}, 'UTF8') as line, a.created_at, a.id
  from public.audit_log as a
 where a.org_id = %(org_id)s
   and (a.created_at, a.id) > (%(after_at)s, %(after_id)s)
   and a.created_at < %(end)s
 order by a.created_at, a.id
 limit %(limit)s
"""

# Built as text rather than with jsonb_build_object (measured: twice as fast), keys in column order.
# json_scalar escapes every text value like to_json, byte for byte, but looks up how to render each
# column once per query instead of once per value (measured: a quarter faster per line).
_NDJSON_LINE = """concat(
    '{"record":"event","id":', a.id,
    ',"created_at":', json_scalar(a.created_at),
    ',"actor":', json_scalar(a.actor),
    ',"actor_user_id":', coalesce(json_scalar(a.actor_user_id)::text, 'null'),
    ',"action":', json_scalar(a.action),
    ',"target_type":', coalesce(json_scalar(a.target_type)::text, 'null'),
    ',"target_id":', coalesce(json_scalar(a.target_id)::text, 'null'),
    ',"details":', a.details,
    ',"request_id":', coalesce(json_scalar(a.request_id)::text, 'null'),
    '}')"""

# RFC 4180: every text field quoted (quotes doubled), NULL as an empty unquoted field. Quoting every
# text field also keeps a spreadsheet from reading a value as a formula.
_CSV_LINE = """concat_ws(',',
    a.id::text,
    to_json(a.created_at) #>> '{}',
    '"' || replace(a.actor, '"', '""') || '"',
    coalesce(a.actor_user_id::text, ''),
    '"' || replace(a.action, '"', '""') || '"',
    coalesce('"' || replace(a.target_type, '"', '""') || '"', ''),
    coalesce('"' || replace(a.target_id, '"', '""') || '"', ''),
    '"' || replace(a.details::text, '"', '""') || '"',
    coalesce('"' || replace(a.request_id, '"', '""') || '"', ''))"""

_PAGE_SQL: Final[dict[ExportFormat, str]] = {
    "ndjson": _PAGE.format(line=_NDJSON_LINE),
    "csv": _PAGE.format(line=_CSV_LINE),
}
MEDIA_TYPES: Final[dict[ExportFormat, str]] = {"ndjson": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


@dataclass(frozen=True)
class AuditExport:
    export_id: uuid.UUID
    media_type: str
    filename: str
    body: AsyncIterator[bytes]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def header_lines(
    fmt: ExportFormat, *, export_id: uuid.UUID, org_id: uuid.UUID, start: datetime, end: datetime
) -> bytes:
    fields = {"export_id": str(export_id), "org_id": str(org_id), "from": _iso(start), "to": _iso(end)}
    if fmt == "ndjson":
        return _json_line({"record": "header", "format": FORMAT_VERSION, **fields})
    meta = ",".join(f"{k}={v}" for k, v in fields.items())
    return f"#{FORMAT_VERSION},{meta}\n{','.join(CSV_COLUMNS)}\n".encode()


def seal_line(fmt: ExportFormat, kind: Literal["checkpoint", "trailer"], *, rows: int, sha256: str) -> bytes:
    if fmt == "ndjson":
        return _json_line({"record": kind, "rows": rows, "sha256": sha256})
    return f"#{kind},rows={rows},sha256={sha256}\n".encode()


def _json_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


async def open_export(
    db: Database,
    claims: Claims,
    *,
    org_id: uuid.UUID,
    start: datetime,
    end: datetime | None,
    fmt: ExportFormat,
    request_id: str | None,
    page_rows: int = PAGE_ROWS,
) -> AuditExport:
    """Check the caller and the range, record the start, and return the stream (nothing read yet)."""
    if start.tzinfo is None or (end is not None and end.tzinfo is None):
        raise Unprocessable("Give times with a time zone offset, e.g. 2026-12-01T00:00:00Z.")
    if end is not None and start >= end:
        raise Unprocessable("The range is empty: 'from' must be before 'to'.")
    async with as_user(db, claims) as conn:
        member = await (await conn.execute(_MEMBER_ROLE, {"org_id": org_id})).fetchone()
    if member is None:
        raise NotFound("No such organization.")
    if member["role"] not in ("owner", "admin"):
        raise Forbidden("Only owners and admins can export the audit log.")
    now: datetime = member["now"]
    end = min(end, now) if end is not None else now  # nothing after the request: the file is stable
    if start >= end:
        raise Unprocessable("The range is empty: 'from' must be before now.")
    await enforce(EXPORTS, str(org_id), detail="Too many audit-log exports for this organization; try again later.")

    export_id = uuid.uuid4()
    actor_user_id = uuid.UUID(str(claims["sub"]))
    details = {"export_id": str(export_id), "from": _iso(start), "to": _iso(end), "format": fmt}
    async with as_service(db) as conn:
        await record(
            conn,
            org_id=org_id,
            action="audit_log.export_started",
            actor=ACTOR,
            actor_user_id=actor_user_id,
            target_type="audit_export",
            target_id=str(export_id),
            details=details,
            request_id=request_id,
        )
    body = _stream(
        db,
        claims,
        fmt,
        org_id=org_id,
        start=start,
        end=end,
        export_id=export_id,
        details=details,
        request_id=request_id,
        page_rows=page_rows,
    )
    stamp = start.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + end.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return AuditExport(export_id, MEDIA_TYPES[fmt], f"audit-log-{org_id}-{stamp}.{fmt}", body)


async def _stream(
    db: Database,
    claims: Claims,
    fmt: ExportFormat,
    *,
    org_id: uuid.UUID,
    start: datetime,
    end: datetime,
    export_id: uuid.UUID,
    details: dict[str, Any],
    request_id: str | None,
    page_rows: int,
) -> AsyncIterator[bytes]:
    hasher = hashlib.sha256()
    rows = 0
    finished = False
    params = {"org_id": org_id, "end": end, "limit": page_rows}
    # The next page is read while this one is joined, hashed and sent, so the database and this
    # process work at the same time: at most two pages in memory, each read in its own transaction.
    pending: asyncio.Task[_Page] | None = asyncio.create_task(
        _read_page(db, claims, fmt, {**params, "after_at": start, "after_id": 0})
    )
    try:
        head = header_lines(fmt, export_id=export_id, org_id=org_id, start=start, end=end)
        hasher.update(head)
        yield head
        while pending is not None:
            page = await pending
            pending = None
            if page.rows == page_rows:
                pending = asyncio.create_task(_read_page(db, claims, fmt, {**params, **page.after}))
            if page.rows == 0:
                break
            chunk = page.body()
            hasher.update(chunk)
            rows += page.rows  # counted when handed out, so a reader that stops here is reported with them
            yield chunk
            if pending is not None:
                checkpoint = seal_line(fmt, "checkpoint", rows=rows, sha256=hasher.hexdigest())
                hasher.update(checkpoint)
                yield checkpoint
        digest = hasher.hexdigest()
        # The anchor is committed before the trailer goes out: a file with a trailer has its event.
        async with as_service(db) as conn:
            await record(
                conn,
                org_id=org_id,
                action="audit_log.exported",
                actor=ACTOR,
                actor_user_id=uuid.UUID(str(claims["sub"])),
                target_type="audit_export",
                target_id=str(export_id),
                details={**details, "rows": rows, "sha256": digest},
                request_id=request_id,
            )
        finished = True
        yield seal_line(fmt, "trailer", rows=rows, sha256=digest)
    finally:
        if pending is not None:
            # The caller went away between pages: stop the read ahead and let it give back its connection.
            pending.cancel()
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved and dropped: the file is cut short either way
        if not finished:
            # The caller went away or a page failed: the file has no trailer and reads as truncated.
            log_event(
                "audit export incomplete",
                logging.WARNING,
                **{ORG_ID: str(org_id), REQUEST_ID: request_id, DECISION_REASON: "audit-export-incomplete"},
                rows=rows,
            )
            await asyncio.shield(_record_incomplete(db, claims, org_id, export_id, details, rows, request_id))


@dataclass(frozen=True)
class _Page:
    rows: int
    after: dict[str, Any]  # the key to resume after: the last row's created_at and id
    result: PGresult | None

    def body(self) -> bytes:
        """The lines as the database sent them, without making a row object of each."""
        if self.result is None:
            return b""
        lines = [self.result.get_value(row, 0) or b"" for row in range(self.rows)]  # never NULL: concat skips NULLs
        return b"\n".join(lines) + b"\n"


async def _read_page(db: Database, claims: Claims, fmt: ExportFormat, params: dict[str, Any]) -> _Page:
    """One page in its own transaction as the user. Only the last row is loaded, for its key."""
    async with as_user(db, claims) as conn:
        await conn.execute(_UTC)
        cursor = await conn.execute(_PAGE_SQL[fmt], params, binary=True)
    result = cursor.pgresult  # complete since the commit
    if result is None or result.ntuples == 0:
        return _Page(0, {}, None)
    await cursor.scroll(result.ntuples - 1, mode="absolute")
    [last] = await cursor.fetchall()
    return _Page(result.ntuples, {"after_at": last["created_at"], "after_id": last["id"]}, result)


async def _record_incomplete(
    db: Database,
    claims: Claims,
    org_id: uuid.UUID,
    export_id: uuid.UUID,
    details: dict[str, Any],
    rows: int,
    request_id: str | None,
) -> None:
    try:
        async with as_service(db) as conn:
            await record(
                conn,
                org_id=org_id,
                action="audit_log.export_incomplete",
                actor=ACTOR,
                actor_user_id=uuid.UUID(str(claims["sub"])),
                target_type="audit_export",
                target_id=str(export_id),
                details={**details, "rows_sent": rows},
                request_id=request_id,
            )
    except Exception as exc:  # best effort: the started event already names this export
        log_event("audit export incomplete not recorded", logging.WARNING, error_type=type(exc).__name__)
