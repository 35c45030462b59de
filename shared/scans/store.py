"""A scan's work state in Postgres: what the worker loads at a claim, saves at every flush, and
publishes at the end. Every write is fenced on the lease (``lease_owner``), so a worker that
outlived its lease can never overwrite the newer claim's progress or publish twice.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Final

from shared.db.session import Connection, Database, as_service, jsonb
from shared.retrieval import VECTOR_PARAMETER


class LeaseLost(Exception):
    """Another worker holds the scan now (this one outlived its lease): stop without writing."""


@dataclass(slots=True)
class StagedChunk:
    url: str
    title: str | None
    content: str
    page_hash: bytes
    embedding: list[float] | None = None

    @property
    def content_hash(self) -> bytes:
        return hashlib.sha256(self.content.encode()).digest()


@dataclass(slots=True)
class ScanState:
    """Everything a worker needs to resume a scan, loaded from its row."""

    id: uuid.UUID
    org_id: uuid.UUID
    agent_id: uuid.UUID
    source_id: uuid.UUID | None
    start_url: str
    page_limit: int
    max_depth: int
    crash_count: int
    owner: str
    frontier: deque[tuple[str, int]]
    visited: list[str]
    pages_found: int
    pages_fetched: int
    pages_skipped: int
    pages_failed: int
    pages_visited: int
    reasons: Counter[str]
    page_hashes: set[bytes] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)
    in_flight: tuple[str, int] | None = None  # taken from the frontier, not yet done: saved as to do

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ScanState:
        visited = [str(url) for url in row["visited"] or []]
        return cls(
            id=row["id"],
            org_id=row["org_id"],
            agent_id=row["agent_id"],
            source_id=row["source_id"],
            start_url=row["start_url"],
            page_limit=row["page_limit"],
            max_depth=row["max_depth"],
            crash_count=row["crash_count"],
            owner=row["lease_owner"],
            frontier=deque((str(url), int(depth)) for url, depth in row["frontier"] or []),
            visited=visited,
            pages_found=row["pages_found"],
            pages_fetched=row["pages_fetched"],
            pages_skipped=row["pages_skipped"],
            pages_failed=row["pages_failed"],
            pages_visited=row["pages_visited"],
            reasons=Counter({str(k): int(v) for k, v in (row["skip_reasons"] or {}).items()}),
            seen=set(visited),
        )

    def see(self, url: str) -> None:
        if url not in self.seen:
            self.seen.add(url)
            self.visited.append(url)

    def skip(self, reason: str, count: int = 1) -> None:
        self.pages_skipped += count
        self.reasons[reason] += count

    def fail(self, reason: str) -> None:
        self.pages_failed += 1
        self.reasons[reason] += 1

    def progress(self) -> dict[str, Any]:
        return {
            "frontier": jsonb(
                [[url, depth] for url, depth in ([self.in_flight] if self.in_flight else []) + list(self.frontier)]
            ),
            "visited": jsonb(self.visited),
            "pages_found": self.pages_found,
            "pages_fetched": self.pages_fetched,
            "pages_skipped": self.pages_skipped,
            "pages_failed": self.pages_failed,
            "pages_visited": self.pages_visited,
            "skip_reasons": jsonb(dict(sorted(self.reasons.items()))),
        }


_PAGE_HASHES: Final = "select distinct page_hash from private.scan_chunks where scan_id = %(id)s"

_FENCE: Final = "where id = %(id)s and status = 'running' and lease_owner = %(owner)s"

_SAVE: Final = f"""
update public.scans
   set frontier = %(frontier)s, visited = %(visited)s, pages_found = %(pages_found)s,
       pages_fetched = %(pages_fetched)s, pages_skipped = %(pages_skipped)s, pages_failed = %(pages_failed)s,
       pages_visited = %(pages_visited)s, skip_reasons = %(skip_reasons)s,
       lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
 {_FENCE}
returning id
"""  # noqa: S608 - _FENCE is a constant

# Back to the queue at once (lease_owner null: not a crash), for the next step to resume; the step
# taken is counted, so the message for it is spent and only the next step's message can claim.
_RELEASE: Final = f"""
update public.scans
   set frontier = %(frontier)s, visited = %(visited)s, pages_found = %(pages_found)s,
       pages_fetched = %(pages_fetched)s, pages_skipped = %(pages_skipped)s, pages_failed = %(pages_failed)s,
       pages_visited = %(pages_visited)s, skip_reasons = %(skip_reasons)s,
       lease_owner = null, lease_expires_at = null, step = step + 1
 {_FENCE}
returning id, step
"""  # noqa: S608 - _FENCE is a constant

_STAGE: Final = f"""
insert into private.scan_chunks (scan_id, org_id, url, title, content, content_hash, page_hash, embedding)
values (%(scan_id)s, %(org_id)s, %(url)s, %(title)s, %(content)s, %(content_hash)s, %(page_hash)s,
        {VECTOR_PARAMETER})
"""  # noqa: S608 - VECTOR_PARAMETER is a constant

_FINISH: Final = f"""
update public.scans
   set frontier = %(frontier)s, visited = %(visited)s, pages_found = %(pages_found)s,
       pages_fetched = %(pages_fetched)s, pages_skipped = %(pages_skipped)s, pages_failed = %(pages_failed)s,
       pages_visited = %(pages_visited)s, skip_reasons = %(skip_reasons)s,
       status = %(status)s, status_reason = %(status_reason)s, error = %(error)s, finished_at = now(),
       lease_owner = null, lease_expires_at = null
 {_FENCE}
returning id, source_id
"""  # noqa: S608 - _FENCE is a constant

_DISCARD: Final = "delete from private.scan_chunks where scan_id = %(scan_id)s"

# A completed scan is the whole site as it is now: every earlier chunk of the source goes.
_DROP_ALL_PREVIOUS: Final = """
delete from public.knowledge_chunks
 where source_id = %(source_id)s and org_id = %(org_id)s and scan_id is distinct from %(scan_id)s
"""

# A scan that stopped early replaces only the pages it fetched again; the rest of the previous
# knowledge stays, so an interrupted rescan never leaves the agent knowing less.
_DROP_REFETCHED: Final = """
delete from public.knowledge_chunks as k
 where k.source_id = %(source_id)s and k.org_id = %(org_id)s
   and k.url in (select distinct s.url from private.scan_chunks as s where s.scan_id = %(scan_id)s)
"""

_PUBLISH: Final = """
with moved as (
  delete from private.scan_chunks where scan_id = %(scan_id)s
  returning id, url, title, content, content_hash, embedding
)
insert into public.knowledge_chunks (org_id, agent_id, source_id, scan_id, url, title, content, content_hash, embedding)
select %(org_id)s, %(agent_id)s, %(source_id)s, %(scan_id)s, url, title, content, content_hash, embedding
  from moved
 order by id
"""

_SOURCE_SCANNED: Final = """
update public.knowledge_sources
   set last_scanned_at = now(), title = coalesce(title, %(title)s)
 where id = %(source_id)s and org_id = %(org_id)s
"""


async def load_page_hashes(db: Database, state: ScanState) -> None:
    async with as_service(db) as conn:
        rows = await (await conn.execute(_PAGE_HASHES, {"id": state.id})).fetchall()
    state.page_hashes = {bytes(row["page_hash"]) for row in rows}


async def _fenced(conn: Connection, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    row = await (await conn.execute(sql, params)).fetchone()
    if row is None:
        raise LeaseLost(str(params["id"]))
    return dict(row)


async def _stage(conn: Connection, state: ScanState, chunks: list[StagedChunk]) -> None:
    if not chunks:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            _STAGE,
            [
                {
                    "scan_id": state.id,
                    "org_id": state.org_id,
                    "url": chunk.url,
                    "title": chunk.title,
                    "content": chunk.content,
                    "content_hash": chunk.content_hash,
                    "page_hash": chunk.page_hash,
                    "embedding": chunk.embedding,
                }
                for chunk in chunks
            ],
        )


async def save(db: Database, state: ScanState, chunks: list[StagedChunk], *, lease_seconds: float) -> None:
    """Progress and the new pages' chunks, in one transaction, renewing the lease."""
    async with as_service(db) as conn:
        await _fenced(
            conn, _SAVE, {"id": state.id, "owner": state.owner, "lease_seconds": lease_seconds, **state.progress()}
        )
        await _stage(conn, state, chunks)


async def release(db: Database, state: ScanState) -> int:
    """Out of time: back to the queue with everything needed to resume. Returns the next step."""
    async with as_service(db) as conn:
        row = await _fenced(conn, _RELEASE, {"id": state.id, "owner": state.owner, **state.progress()})
    return int(row["step"])


async def finish(
    db: Database,
    state: ScanState,
    *,
    status: str,
    status_reason: str,
    error: str | None,
    complete: bool,
    title: str | None,
) -> None:
    """The final status and the publication of the scan's chunks, in one transaction.

    ``complete``: the scan saw the whole site (within its limits), so it replaces all of the
    source's earlier chunks; otherwise it replaces only the pages it fetched again.
    """
    async with as_service(db) as conn:
        row = await _fenced(
            conn,
            _FINISH,
            {
                "id": state.id,
                "owner": state.owner,
                "status": status,
                "status_reason": status_reason,
                "error": error,
                **state.progress(),
            },
        )
        # Read back under the row lock: a source deleted meanwhile takes its knowledge with it.
        source_id = row["source_id"]
        params = {"scan_id": state.id, "org_id": state.org_id, "agent_id": state.agent_id, "source_id": source_id}
        if source_id is None:
            await conn.execute(_DISCARD, params)
            return
        await conn.execute(_DROP_ALL_PREVIOUS if complete else _DROP_REFETCHED, params)
        await conn.execute(_PUBLISH, params)
        await conn.execute(_SOURCE_SCANNED, {**params, "title": title})
