"""The scan worker: one invocation claims scans and works on them within a time budget.

Serverless functions are killed at their limit, so nothing lives only in memory for long:

* **Flushes.** Pages are processed in small batches (``flush_seconds`` of work, ``flush_pages``
  pages visited or ``flush_chunks`` chunks, whichever comes first): the batch's chunks are
  embedded in one gateway call (budgeted and metered), then the chunks, the frontier, the visited
  set and the counters are saved in one transaction that also renews the lease. A worker killed
  between flushes loses only the unsaved batch; the next worker resumes from the last flush and
  fetches those few pages again.
* **Time budget.** No page is started after ``time_budget_seconds``; the worker flushes and
  releases the scan (``lease_owner`` null), and the next invocation resumes it at once.
* **Leases.** A scan whose lease expired while owned was left by a dead worker; the next claim
  counts it (``crash_count``) and, past ``max_crashes``, fails the scan rather than retry forever.
* **The end.** Frontier empty, or page limit reached: one transaction sets the final status and
  moves the staged chunks into the agent's knowledge (``shared.scans.store.finish``).
* **Budget.** An embedding call the organization's budget refuses stops the scan with status
  ``budget_exhausted``: the batch in hand is stored without embeddings (served by full-text search),
  earlier batches keep theirs, and the gateway has metered every call made (and the refusal).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
from upstash_redis.asyncio import Redis

from shared.db.session import Database
from shared.errors import BudgetExhausted, ModelUnavailable, RateLimited
from shared.gateway import embed
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.queues import PRODUCTION as QUEUE
from shared.queues import SCAN_STEPS_TOPIC, QueueEnvironment, message_id_field
from shared.redis import get_redis
from shared.scans import store
from shared.scans.chunking import chunk_text
from shared.scans.crawler import (
    Crawler,
    Failed,
    Outcome,
    Page,
    Skipped,
    has_binary_extension,
    new_client,
    normalise,
)
from shared.scans.extract import Extracted, extract_html, extract_plain
from shared.scans.schemas import PRODUCTION, USER_AGENT_TOKEN, ScanEnvironment, Skip, StatusReason
from shared.scans.service import announce_step, claim_scan, step_come_back_in, worker_identity
from shared.scans.store import LeaseLost, ScanState, StagedChunk

EMBED_SLICE: Final = 512  # texts per embedding call (the API takes up to 2,048)
FRONTIER_FACTOR: Final = 4
FRONTIER_SLACK: Final = 100
_WHITESPACE: Final = str.maketrans(dict.fromkeys("\t\r\n\x0c\x0b", " "))


@dataclass(slots=True)
class RunReport:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    budget_exhausted: int = 0
    released: int = 0
    lost_leases: int = 0
    errors: int = 0
    pages: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "claimed": self.claimed,
            "completed": self.completed,
            "failed": self.failed,
            "budget_exhausted": self.budget_exhausted,
            "released": self.released,
            "lost_leases": self.lost_leases,
            "errors": self.errors,
            "pages": self.pages,
        }


@dataclass(slots=True)
class _Pending:
    url: str
    title: str | None
    chunks: list[str]
    page_hash: bytes


@dataclass(slots=True)
class _Batch:
    pages: list[_Pending] = field(default_factory=list)  # to store
    chunks: int = 0
    visits: int = 0  # pages taken from the frontier since the last flush, stored or not
    started: float = field(default_factory=time.monotonic)


def _frontier_cap(state: ScanState) -> int:
    """Room in the frontier: generous (some entries end without a request), but bounded, so a
    page with thousands of links cannot grow the saved state past what the page limit can use."""
    return FRONTIER_FACTOR * max(0, state.page_limit - state.pages_visited) + FRONTIER_SLACK


def page_hash(text: str) -> bytes:
    """Same words in the same order = same page, whatever the whitespace."""
    return hashlib.sha256(" ".join(text.translate(_WHITESPACE).split()).lower().encode()).digest()


def embedding_input(title: str | None, content: str) -> str:
    return f"{title}\n\n{content}" if title else content


async def run_scans(
    db: Database,
    *,
    env: ScanEnvironment = PRODUCTION,
    queue: QueueEnvironment = QUEUE,
    request_id: str | None = None,
) -> RunReport:
    """The cron sweeper: claim scans nobody has touched for a while (their step message was lost) or
    whose worker died, and work on them until the time budget is spent; a scan still unfinished then
    goes back to the queue with a message for its next step."""
    deadline = time.monotonic() + env.time_budget_seconds
    report = RunReport()
    request_id = request_id or "req_" + secrets.token_hex(12)

    async def lane() -> None:
        while time.monotonic() < deadline:
            row = await claim_scan(
                db,
                owner=worker_identity(env),
                lease_seconds=env.lease_seconds,
                stale_after_seconds=env.stale_after_seconds,
            )
            if row is None:
                return
            report.claimed += 1
            run = _ScanRun(db, env, ScanState.from_row(row), deadline=deadline, report=report, request_id=request_id)
            await _guarded(run, queue)

    await asyncio.gather(*(lane() for _ in range(max(1, env.concurrency))))
    return report


async def run_step(
    db: Database,
    scan_id: uuid.UUID,
    step: int,
    *,
    env: ScanEnvironment = PRODUCTION,
    queue: QueueEnvironment = QUEUE,
    request_id: str | None = None,
) -> tuple[RunReport, float | None]:
    """One queue step of one scan: claim exactly that step, fetch pages for ``step_seconds``, flush
    once, release, and send the message for the next step (none once the scan has ended).

    Returns the report and, when the step is held by a live lease (its holder may have died), the
    seconds after which the message should come back; ``None`` acknowledges the message.
    """
    report = RunReport()
    request_id = request_id or "req_" + secrets.token_hex(12)
    row = await claim_scan(db, owner=worker_identity(env), lease_seconds=env.lease_seconds, only=scan_id, step=step)
    if row is None:
        return report, await step_come_back_in(db, scan_id, step)
    report.claimed += 1
    deadline = time.monotonic() + env.step_seconds
    run = _ScanRun(
        db, env, ScanState.from_row(row), deadline=deadline, report=report, request_id=request_id, one_batch=True
    )
    await _guarded(run, queue)
    return report, None


async def _guarded(run: _ScanRun, queue: QueueEnvironment) -> None:
    state, report, request_id = run.state, run.report, run.request_id
    try:
        next_step = await run.run()
    except LeaseLost:
        report.lost_leases += 1
        _log(state, request_id, "scan lease lost: another worker holds it now", "lease-lost", logging.WARNING)
    except Exception as exc:
        # The lease stays held until it expires; the next claim counts a crash (max_crashes).
        report.errors += 1
        _log(state, request_id, "scan stopped by an error", "scan-error", logging.ERROR, error_type=type(exc).__name__)
    else:
        if next_step is not None:
            await announce_step(queue, state.id, next_step)


# Keyed by the environment's identity (it may hold an unhashable resolver), kept with it alive.
_step_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[int, tuple[ScanEnvironment, httpx.AsyncClient]]  # noqa: TID251
] = weakref.WeakKeyDictionary()


def _step_client(env: ScanEnvironment) -> httpx.AsyncClient:  # noqa: TID251 - built by new_client
    clients = _step_clients.setdefault(asyncio.get_running_loop(), {})
    held = clients.get(id(env))
    if held is None or held[1].is_closed:
        held = clients[id(env)] = (env, new_client(env))
    return held[1]


async def close_clients() -> None:
    """Close the running loop's step clients (end of a process, a benchmark, a test)."""
    for _, client in _step_clients.pop(asyncio.get_running_loop(), {}).values():
        await client.aclose()


def _shared_redis() -> Redis | None:
    """Redis for host turns and robots.txt rules across invocations; ``None`` when not configured."""
    try:
        return get_redis()
    except Exception:  # no client can be built: pace in memory (politeness.HostTurns explains)
        return None


def _log(
    state: ScanState, request_id: str, message: str, reason: str, level: int = logging.INFO, **fields: Any
) -> None:
    log_event(
        message,
        level,
        **{REQUEST_ID: request_id, ORG_ID: str(state.org_id), DECISION_REASON: reason},
        scan_id=str(state.id),
        pages_fetched=state.pages_fetched,
        pages_skipped=state.pages_skipped,
        pages_failed=state.pages_failed,
        **fields,
    )


class _ScanRun:
    def __init__(
        self,
        db: Database,
        env: ScanEnvironment,
        state: ScanState,
        *,
        deadline: float,
        report: RunReport,
        request_id: str,
        one_batch: bool = False,
    ) -> None:
        self.db = db
        self.env = env
        self.state = state
        self.deadline = deadline
        self.report = report
        self.request_id = request_id
        # A queue step: one batch, flushed when the step's time is up (not on the batch timer).
        self.one_batch = one_batch
        self.batch = _Batch()
        self.title: str | None = None
        self.budget_exhausted = False
        self.next: tuple[tuple[str, int], asyncio.Task[tuple[Outcome, bool]]] | None = None
        self.next_step: int | None = None  # set when the scan was released unfinished
        self.fetches_started = 0

    async def run(self) -> int | None:
        """Work until the deadline or the end; the next step's number when released unfinished."""
        state = self.state
        if state.crash_count > self.env.max_crashes:
            await self._finish("failed", StatusReason.WORKER_CRASHED, "The scan stopped its worker too many times.")
            return None
        await store.load_page_hashes(self.db, state)
        crawler = Crawler(
            self.env,
            start_url=state.start_url,
            agent_token=USER_AGENT_TOKEN,
            redis=_shared_redis(),
            cache_scope=str(state.id),
            # A step is one scan per invocation: its client outlives the step (building one costs more
            # than a few pages), while the cron's lanes each keep their own.
            client=_step_client(self.env) if self.one_batch else None,
        )
        async with crawler:
            try:
                await self._crawl(crawler)
            finally:
                if self.next is not None:  # an error while a fetch was in flight
                    self.next[1].cancel()
        return self.next_step

    async def _crawl(self, crawler: Crawler) -> None:
        """Fetch page N+1 while page N is extracted (in a thread): one request in flight at a time,
        so the politeness rules hold; the page in flight is saved as still to do at every flush."""
        state = self.state
        while True:
            if self.next is None:
                if not state.frontier:
                    await self._flush()
                    if not self.budget_exhausted:
                        await self._complete(StatusReason.SITE_EXHAUSTED)
                    return
                if state.pages_visited >= state.page_limit:
                    await self._flush()
                    if not self.budget_exhausted:
                        state.skip(Skip.PAGE_LIMIT, len(state.frontier))
                        state.frontier.clear()
                        await self._complete(StatusReason.PAGE_LIMIT)
                    return
                if self._out_of_time():
                    await self._flush()
                    if not self.budget_exhausted:
                        self.next_step = await store.release(self.db, state)
                        self.report.released += 1
                        _log(state, self.request_id, "scan paused: time budget spent", "time-budget")
                    return
                self._start_fetch(crawler)
            assert self.next is not None  # noqa: S101 - set just above
            (_url, depth), task = self.next
            outcome, requested = await task
            self.next = None
            state.in_flight = None
            if requested:
                state.pages_visited += 1
                self.report.pages += 1
            if state.frontier and state.pages_visited < state.page_limit and not self._out_of_time():
                self._start_fetch(crawler)
            await self._handle(crawler, outcome, depth)
            self.batch.visits += 1
            if (
                self.batch.visits >= self.env.flush_pages
                or self.batch.chunks >= self.env.flush_chunks
                or (not self.one_batch and time.monotonic() - self.batch.started >= self.env.flush_seconds)
            ):
                await self._flush()
                if self.budget_exhausted:
                    if self.next is not None:
                        self.next[1].cancel()
                        self.next = None
                    return

    def _out_of_time(self) -> bool:
        """No new page after the deadline, but at least one per run: a slow start (a cold client, a
        busy machine) must not make every step end before it fetched anything."""
        return self.fetches_started > 0 and time.monotonic() >= self.deadline

    # -- one page ---------------------------------------------------------------------------------

    def _start_fetch(self, crawler: Crawler) -> None:
        self.fetches_started += 1
        url, depth = self.state.frontier.popleft()
        self.state.in_flight = (url, depth)
        self.next = ((url, depth), asyncio.create_task(self._fetch(crawler, url)))

    async def _fetch(self, crawler: Crawler, url: str) -> tuple[Outcome, bool]:
        before = crawler.page_requests  # fetches never overlap: the difference is this page's
        outcome = await crawler.fetch(url, seen=self.state.seen)
        return outcome, crawler.page_requests > before

    async def _handle(self, crawler: Crawler, outcome: Outcome, depth: int) -> None:
        state = self.state
        if not isinstance(outcome, Failed):
            for hop in outcome.hops:
                state.see(hop)
        if isinstance(outcome, Failed):
            state.fail(outcome.reason)
            return
        if isinstance(outcome, Skipped):
            state.skip(outcome.reason)
            return
        await self._page(crawler, outcome, depth)

    async def _page(self, crawler: Crawler, page: Page, depth: int) -> None:
        state = self.state
        try:
            if page.html:
                extracted = await asyncio.to_thread(extract_html, page.body, page.content_type, url=page.url)
            else:
                extracted = extract_plain(page.body, page.content_type)
        except Exception as exc:  # one page the extractor chokes on must not stop the scan
            state.skip(Skip.UNREADABLE)
            _log(state, self.request_id, "page could not be extracted", "unreadable", error_type=type(exc).__name__)
            return
        self._enqueue_links(crawler, extracted, page.url, depth)
        if extracted.noindex:
            state.skip(Skip.NOINDEX)
            return
        if not extracted.text:
            state.skip(Skip.NO_TEXT)
            return
        digest = page_hash(extracted.text)
        if digest in state.page_hashes:
            state.skip(Skip.DUPLICATE_CONTENT)
            return
        state.page_hashes.add(digest)
        chunks = chunk_text(extracted.text)
        if not chunks:
            state.skip(Skip.NO_TEXT)
            return
        self.title = self.title or extracted.title
        self.batch.pages.append(_Pending(page.url, extracted.title, chunks, digest))
        self.batch.chunks += len(chunks)
        state.pages_fetched += 1

    def _enqueue_links(self, crawler: Crawler, extracted: Extracted, page_url: str, depth: int) -> None:
        state = self.state
        base = normalise(extracted.base, page_url) if extracted.base else None
        for href in extracted.links:
            url = normalise(href, base or page_url)
            if url is None or url in state.seen or not crawler.same_site(url):
                continue
            state.see(url)
            state.pages_found += 1
            if depth + 1 > state.max_depth:
                state.skip(Skip.DEPTH_LIMIT)
            elif has_binary_extension(url):
                state.skip(Skip.NOT_HTML)
            elif len(state.frontier) >= _frontier_cap(state):
                state.skip(Skip.PAGE_LIMIT)  # more than the page limit could ever reach
            else:
                state.frontier.append((url, depth + 1))

    # -- batches ----------------------------------------------------------------------------------

    async def _flush(self) -> None:
        batch, self.batch = self.batch, _Batch()
        staged = [
            StagedChunk(url=page.url, title=page.title, content=content, page_hash=page.page_hash)
            for page in batch.pages
            for content in page.chunks
        ]
        if staged:
            await self._embed(staged)
        await store.save(self.db, self.state, staged, lease_seconds=self.env.lease_seconds)
        if self.budget_exhausted:
            await self._finish(
                "budget_exhausted",
                StatusReason.BUDGET_EXHAUSTED,
                "The organization's monthly model budget ran out; the pages scanned so far were kept.",
            )

    async def _embed(self, chunks: Sequence[StagedChunk]) -> None:
        """Embeddings for ``chunks``, in place; a refusal leaves the rest without (full-text only)."""
        for start in range(0, len(chunks), EMBED_SLICE):
            part = chunks[start : start + EMBED_SLICE]
            texts = [embedding_input(chunk.title, chunk.content) for chunk in part]
            vectors = await self._embed_texts(texts)
            if vectors is None:  # offline provider, or refused: the rest stays full-text only
                return
            for chunk, vector in zip(part, vectors, strict=True):
                chunk.embedding = vector

    async def _embed_texts(self, texts: list[str]) -> list[list[float]] | None:
        state = self.state
        for attempt in (1, 2):
            try:
                return await embed(
                    self.db,
                    org_id=state.org_id,
                    agent_id=state.agent_id,
                    scan_id=state.id,
                    texts=texts,
                    request_id=self.request_id,
                )
            except BudgetExhausted:
                self.budget_exhausted = True
                return None
            except RateLimited as limited:
                if attempt == 1 and time.monotonic() + limited.retry_after_seconds < self.deadline:
                    await asyncio.sleep(limited.retry_after_seconds)
                    continue
                _log(state, self.request_id, "chunks stored without embeddings", "embedding-rate-limited")
                return None
            except ModelUnavailable:
                if attempt == 1:
                    continue
                _log(state, self.request_id, "chunks stored without embeddings", "embedding-unavailable")
                return None
        return None

    # -- the end ----------------------------------------------------------------------------------

    async def _complete(self, reason: StatusReason) -> None:
        state = self.state
        if state.pages_fetched == 0:
            why = ", ".join(sorted(state.reasons)) or "no page found"
            await self._finish("failed", StatusReason.START_URL_FAILED, f"No page could be stored ({why}).")
            return
        await self._finish("completed", reason, None, complete=True)

    async def _finish(self, status: str, reason: StatusReason, error: str | None, *, complete: bool = False) -> None:
        await store.finish(
            self.db, self.state, status=status, status_reason=reason, error=error, complete=complete, title=self.title
        )
        counter = {"completed": "completed", "failed": "failed", "budget_exhausted": "budget_exhausted"}[status]
        setattr(self.report, counter, getattr(self.report, counter) + 1)
        _log(self.state, self.request_id, f"scan {status}", reason)


async def on_message(
    db: Database,
    payload: object,
    *,
    env: ScanEnvironment = PRODUCTION,
    queue: QueueEnvironment = QUEUE,
) -> float | None:
    """A ``scan-steps`` message (``{"scan_id": …, "step": n}``): ``run_step`` for the step it names.
    Returns the seconds after which the message should come back, or ``None`` to acknowledge it."""
    scan_id = message_id_field(payload, "scan_id", topic=SCAN_STEPS_TOPIC)
    step = payload.get("step") if isinstance(payload, dict) else None
    if scan_id is None or not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    _, come_back_in = await run_step(db, scan_id, step, env=env, queue=queue)
    return come_back_in
