"""Audit-log export: an organization's rows for a time range, as NDJSON or CSV, streamed.

- Only owners and admins of the organization (404 outside it, 403 for members); every page is
  read *as the user*, so row-level security is the wall for the export too.
- Keyset pages of ``PAGE_ROWS`` rows in ``(created_at, id)`` order, each its own short
  transaction: no connection is held between pages and memory does not grow with the log. A page
  first asks for the key of its last row (an index-only scan), so the next page can start on
  another connection while this one is still being rendered: ``READ_AHEAD`` pages are read while
  the current one is sent, each on its own connection, so the database renders on as many cores.
  The database renders the page as one block (each row as its line, joined in order), so no row
  becomes a Python object and the client wakes up a few times per page rather than per few rows.
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
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from shared.audit.log import record
from shared.auth import Claims
from shared.db.session import Database, as_service, as_user
from shared.errors import Forbidden, NotFound, Unprocessable
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.ratelimit import RateLimitRule, enforce

FORMAT_VERSION: Final = "hiredhands-audit-export/v1"
PAGE_ROWS: Final = 5000
# Pages read while the current one is sent, each on its own connection (so at most 1 + READ_AHEAD
# pages in memory and as many connections in use).
READ_AHEAD: Final = 2
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

# Each page's transaction: times rendered in UTC, and text sent as UTF-8 whatever the connection's
# encoding (the server converts only if the database's encoding differs; the page is sent as is).
_PAGE_SETTINGS = "select set_config('timezone', 'UTC', true), set_config('client_encoding', 'UTF8', true)"

# Where a page ends: the key of its last row, PAGE_ROWS rows after the key it resumes from. An
# index-only scan over (org_id, created_at, id), about a millisecond; no row means this is the last page.
_PAGE_END = """
select a.created_at, a.id
  from public.audit_log as a
 where a.org_id = %(org_id)s
   and (a.created_at, a.id) > (%(after_at)s, %(after_id)s)
   and a.created_at < %(end)s
 order by a.created_at, a.id
offset %(offset)s limit 1
"""

# One page: each row rendered by the database as its line, and the lines joined in (created_at, id)
# order into one block, with the row count. One value per page rather than one result row per
# line: the client then parses and wakes up for a handful of large reads instead of a row every few
# hundred bytes, which cost more client time than the whole rest of the export (measured). The
# ORDER BY of the aggregate is the index's order, so the database sorts nothing. The block is read
# as the bytes sent (text format, UTF-8 by ``_PAGE_SETTINGS``), never decoded.
_PAGE = """
select string_agg({line} || e'\\n', '' order by a.created_at, a.id) as body, count(*) as rows
  from public.audit_log as a
 where a.org_id = %(org_id)s
   and (a.created_at, a.id) > (%(after_at)s, %(after_id)s)
   and a.created_at < %(end)s{until}
"""
_UNTIL = """
   and (a.created_at, a.id) <= (%(until_at)s, %(until_id)s)"""

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

# Per format: the page that ends at a known key, and the last page (up to the end of the range).
_PAGE_SQL: Final[dict[ExportFormat, tuple[str, str]]] = {
    "ndjson": (_PAGE.format(line=_NDJSON_LINE, until=_UNTIL), _PAGE.format(line=_NDJSON_LINE, until="")),
    "csv": (_PAGE.format(line=_CSV_LINE, until=_UNTIL), _PAGE.format(line=_CSV_LINE, until="")),
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
    read_ahead: int = READ_AHEAD,
) -> AuditExport:
    """Check the caller and the range, record the start, and return the stream (nothing read yet).

    ``page_rows`` and ``read_ahead`` (pages read while one is sent, each holding a connection) are
    the code's own settings, never the caller's; both at least 1.
    """
    if page_rows < 1 or read_ahead < 1:
        raise ValueError("page_rows and read_ahead must be at least 1")
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
        read_ahead=read_ahead,
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
    read_ahead: int,
) -> AsyncIterator[bytes]:
    hasher = hashlib.sha256()
    rows = 0
    finished = False
    params = {"org_id": org_id, "end": end, "offset": page_rows - 1}
    # Pages are read ahead while the current one is hashed and sent, each in its own transaction on
    # its own connection: a page starts as soon as the key ending the one before it is known, so the
    # database renders several pages at once and this process works meanwhile. At most
    # 1 + read_ahead pages in memory.
    newest = _PageRead(db, claims, fmt, {**params, "after_at": start, "after_id": 0})
    reads: deque[_PageRead] = deque([newest])  # the page being sent first, then the reads ahead of it
    try:
        head = header_lines(fmt, export_id=export_id, org_id=org_id, start=start, end=end)
        hasher.update(head)
        yield head
        while reads:
            current = reads[0]
            while len(reads) <= read_ahead and (after := await newest.next_after) is not None:
                newest = _PageRead(db, claims, fmt, {**params, **after})
                reads.append(newest)
            page = await current.task
            reads.popleft()  # done; the rest are still being read
            if page.body:
                hasher.update(page.body)
                rows += page.rows  # counted when handed out, so a reader that stops here is reported with them
                yield page.body
            if await current.next_after is not None:  # a full page: another follows
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
        if reads:
            # The caller went away or a page failed: stop the reads ahead and let each give back its
            # connection before anything else uses the database.
            tasks = [read.task for read in reads]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()  # retrieved and dropped: the file is cut short either way
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
    body: bytes  # the page's lines as the database rendered them, each ending in a newline


class _PageRead:
    """One page read in its own transaction as the user, started at once.

    ``next_after`` resolves early, as soon as the key that ends this page is known: the key the
    next page resumes after, or None when this is the last page (or its read failed, which
    ``task`` then raises).
    """

    def __init__(self, db: Database, claims: Claims, fmt: ExportFormat, params: dict[str, Any]) -> None:
        self.next_after: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._read(db, claims, fmt, params))

    def _resolve(self, after: dict[str, Any] | None) -> None:
        if not self.next_after.done():  # a waiter that was cancelled cancels the future with it
            self.next_after.set_result(after)

    async def _read(self, db: Database, claims: Claims, fmt: ExportFormat, params: dict[str, Any]) -> _Page:
        try:
            async with as_user(db, claims) as conn:
                await conn.execute(_PAGE_SETTINGS)
                key = await (await conn.execute(_PAGE_END, params)).fetchone()
                if key is None:
                    self._resolve(None)
                    cursor = await conn.execute(_PAGE_SQL[fmt][1], params)
                else:
                    self._resolve({"after_at": key["created_at"], "after_id": key["id"]})
                    until = {"until_at": key["created_at"], "until_id": key["id"]}
                    cursor = await conn.execute(_PAGE_SQL[fmt][0], {**params, **until})
        except BaseException:
            self._resolve(None)  # start no page after this one; awaiting the task raises
            raise
        result = cursor.pgresult  # complete since the commit: one row, the block as sent and the count
        body = result.get_value(0, 0) if result is not None and result.ntuples == 1 else None
        if result is None or body is None:  # no rows: the aggregate of nothing is NULL
            return _Page(0, b"")
        return _Page(int(result.get_value(0, 1) or 0), body)


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
