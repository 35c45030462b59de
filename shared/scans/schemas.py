"""Request and response shapes for scans, the enumerated outcomes, and the environment a scan runs in."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.cards import Identifier
from shared.egress import SCAN_POLICY, EgressPolicy, Resolver

ScanStatus = Literal["queued", "running", "completed", "failed", "budget_exhausted", "cancelled"]
FINAL_STATUSES: Final = frozenset({"completed", "failed", "budget_exhausted", "cancelled"})

# Product name and a page that says who we are: site owners can find us and write robots.txt rules.
USER_AGENT_TOKEN: Final = "HiredHandsBot"  # noqa: S105 - a robots.txt user-agent token, not a secret
USER_AGENT: Final = f"Mozilla/5.0 (compatible; {USER_AGENT_TOKEN}/1.0; +https://hiredhands.dev/bot)"

MAX_PAGE_LIMIT: Final = 10_000
DEFAULT_MAX_DEPTH: Final = 5


class Skip(StrEnum):
    """Why a page found on the site was not stored. Stable: the keys of ``scans.skip_reasons``."""

    ROBOTS = "robots"  # robots.txt disallows it for our user agent
    ROBOTS_UNREACHABLE = "robots_unreachable"  # robots.txt failed with 5xx/network: RFC 9309 says assume disallow
    NOT_HTML = "not_html"  # a binary extension, or a Content-Type that is neither HTML nor plain text
    TOO_LARGE = "too_large"  # over the egress policy's response cap
    HTTP_ERROR = "http_error"  # 4xx
    OFF_SITE = "off_site"  # redirected to another site
    DUPLICATE_URL = "duplicate_url"  # redirected to a page already found
    DUPLICATE_CONTENT = "duplicate_content"  # the same extracted text as a page already stored
    REDIRECT_LOOP = "redirect_loop"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    NO_TEXT = "no_text"  # nothing left after extraction
    UNREADABLE = "unreadable"  # the extractor failed on it
    NOINDEX = "noindex"  # <meta name="robots" content="noindex">
    DEPTH_LIMIT = "depth_limit"
    PAGE_LIMIT = "page_limit"  # found, but the scan's page limit was reached first
    # The egress guard refused the destination (e.g. a same-site name that resolves to 10.0.0.0/8,
    # or a redirect into 169.254.169.254); recorded as egress_<reason code of docs/egress.md>.
    EGRESS_PRIVATE_ADDRESS = "egress_private_address"
    EGRESS_METADATA = "egress_metadata"
    EGRESS_OTHER = "egress_denied"


class Failure(StrEnum):
    """Why a fetch failed (counted in ``pages_failed``; also tallied in ``skip_reasons``)."""

    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"  # 5xx
    CONNECTION_ERROR = "connection_error"  # refused, reset, DNS failure, TLS failure


class StatusReason(StrEnum):
    """Why a scan ended (``scans.status_reason``)."""

    SITE_EXHAUSTED = "site_exhausted"  # every page found was visited
    PAGE_LIMIT = "page_limit"  # stopped at the page limit with pages left
    BUDGET_EXHAUSTED = "budget_exhausted"  # the organization's monthly model budget ran out
    START_URL_FAILED = "start_url_failed"  # not a single page could be stored
    WORKER_CRASHED = "worker_crashed"  # leases expired too often: the scan kills its worker


class ScanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: uuid.UUID
    start_url: Annotated[str, Field(min_length=8, max_length=2048), Identifier("a URL")]
    # Capped by the plan (organization_limits.max_scan_pages); omitted means the plan's maximum.
    page_limit: Annotated[int, Field(ge=1, le=MAX_PAGE_LIMIT)] | None = None
    max_depth: Annotated[int, Field(ge=0, le=20)] = DEFAULT_MAX_DEPTH


class ScanOut(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    agent_id: uuid.UUID
    source_id: uuid.UUID | None
    start_url: str
    page_limit: int
    max_depth: int
    status: ScanStatus
    status_reason: str | None
    error: str | None
    pages_found: int
    pages_fetched: int
    pages_skipped: int
    pages_failed: int
    skip_reasons: dict[str, int]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanEnvironment:
    """How scans reach the web and pace themselves. Production uses ``PRODUCTION``; only code (tests, the
    benchmark) builds another one, e.g. with a loopback exception in the policy and a fake resolver."""

    policy: EgressPolicy = SCAN_POLICY
    resolver: Resolver | None = None
    user_agent: str = USER_AGENT
    # Between two requests to one host. robots.txt's Crawl-delay raises it, up to max_crawl_delay.
    politeness_seconds: float = 1.0
    max_crawl_delay_seconds: float = 10.0
    # One page, connect to last byte (the policy bounds each read; this bounds a slow drip).
    page_timeout_seconds: float = 20.0
    # Per invocation: no new page is started after this. Vercel must allow the function
    # time_budget + page_timeout + a flush (maxDuration 60 s or more).
    time_budget_seconds: float = 30.0
    # One queue step: pages for this long, then one flush, the release, and the next step's message.
    step_seconds: float = 5.0
    # The cron sweeper takes a queued or paused scan only after it has been left alone this long (its
    # step message was lost); fresher ones belong to their message. Expired leases are taken at once.
    stale_after_seconds: float = 60.0
    # Renewed at every flush; must exceed the longest gap between flushes (a page, an embedding call).
    lease_seconds: float = 90.0
    concurrency: int = 3  # scans worked on at once by one invocation (different sites)
    # Pages are stored, with their embeddings, in batches: after this many seconds of work, pages
    # visited or chunks, whichever comes first. A killed worker loses at most one batch, which the
    # next one fetches again; with the default politeness the time bound is the one that counts.
    flush_seconds: float = 5.0
    flush_pages: int = 32
    flush_chunks: int = 256
    max_crashes: int = 3
    robots_max_bytes: int = 512 * 1024  # RFC 9309: parse at least 500 KiB
    worker_id: str | None = None  # lease owner prefix; default host and process id


PRODUCTION: Final = ScanEnvironment()


def get_scan_environment() -> ScanEnvironment:
    """FastAPI dependency (tests override it in code, never through configuration)."""
    return PRODUCTION
