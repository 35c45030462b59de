"""Reconciliation: what we metered, per UTC day and model, against the provider's own figures.

A scheduled job (``functions/cron_reconcile.py``) runs ``reconcile`` once a day over the last
``DAYS_CHECKED`` complete days:

1. **Ours**: ``usage_events`` summed per day and model in one SQL statement (requests, prompt and
   completion tokens, cost, and the part of the cost that is an estimate), over every call that
   reached a provider (``rejected`` and ``offline`` rows are left out). The sums run in Postgres,
   so the job's memory does not grow with the number of rows.
2. **Theirs**, from a ``UsageSource``: today the platform's OpenAI organization through its admin
   usage API (``/v1/organization/usage/completions`` and ``/usage/embeddings`` grouped by model,
   ``/v1/organization/costs`` grouped by line item, ``bucket_width=1d``, every page). A model's dated
   snapshot (``gpt-4o-mini-2024-07-18``) counts as the model we price (``gpt-4o-mini``).
3. **The comparison**: drift = (ours - theirs) / theirs for total tokens and for cost. Status
   ``drift`` when either passes ``DRIFT_THRESHOLD`` (2%) in either direction (above: we charged
   more than the provider billed, usually estimates; below: calls went unmetered), ``missing`` when
   the provider has no figures for a day and model we metered (its data can lag by hours), else
   ``agree``. Each result is appended to ``private.usage_reconciliations`` with the run's id;
   drifts are logged (``decision_reason=metering-drift``) and ``metering_health`` reports them.

Nothing here writes ``usage_events``: the ledger is append-only, and a correction would be a new
row, made by a person who has read the drift.

Per-organization keys: a ``UsageSource`` names itself (``source``), says which of our rows it
covers (``covers``, a SQL condition on ``usage_events``) and fetches the provider's figures. The
platform source covers the rows the platform key paid for (``key_source = 'platform'``); a source
for an organization's own key would cover that organization's rows with ``key_source =
'organization'``, with figures read through that key's own organization (an admin key the
organization gives us, which today it does not).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from shared.db.session import Database, as_service
from shared.logs import DECISION_REASON, log_event
from shared.pricing import OFFLINE_MODEL, PRICES
from shared.settings import get_settings

if TYPE_CHECKING:
    from psycopg import sql

DRIFT_THRESHOLD = 0.02
DAYS_CHECKED = 3
STALE_AFTER = timedelta(hours=36)
"""The health check calls a reconciliation that has not run for this long stale (the job is daily)."""
MICROUSD_PER_USD = 1_000_000
PAGE_LIMIT = 31
MAX_PAGES = 100
"""A report never needs more pages than this for a few days; more means a provider loop."""

Status = Literal["agree", "drift", "missing"]
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


@dataclass(slots=True)
class Figures:
    """Requests, tokens and cost of one day and model, from one side."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_microusd: int = 0
    has_tokens: bool = False
    has_cost: bool = False

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Metered:
    requests: int
    input_tokens: int
    output_tokens: int
    cost_microusd: int
    estimated_cost_microusd: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Result:
    day: date
    model: str
    metered: Metered
    provider: Figures | None
    token_drift: float | None
    cost_drift: float | None
    status: Status


@dataclass(slots=True)
class Report:
    run_id: uuid.UUID
    source: str
    results: list[Result] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        counts = {status: sum(r.status == status for r in self.results) for status in ("agree", "drift", "missing")}
        return {"source": self.source, "checked": len(self.results), **counts}


class UsageSource(Protocol):
    @property
    def source(self) -> str:
        """The name results are stored under (one per provider organization or key)."""
        ...

    def covers(self) -> sql.Composable:
        """The condition on ``usage_events`` (alias ``u``) that selects the rows this source bills."""
        ...

    async def fetch(self, start: date, end: date) -> dict[tuple[date, str], Figures]:
        """The provider's figures per day and model for ``start`` <= day < ``end``."""
        ...


class MalformedReport(Exception):
    """The provider's report is not the documented shape."""


# -- the platform's OpenAI organization -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAIOrganization:
    """The platform key's organization, read with an admin key through the usage and costs API."""

    admin_key: str
    base_url: str
    timeout_seconds: float = 30.0
    source: str = "openai-organization"

    def covers(self) -> sql.Composable:
        from psycopg import sql  # the driver loads with the first query, not at start

        # Calls paid by the platform key; an organization's own key is billed to its own account.
        return sql.SQL("u.key_source = 'platform'")

    async def fetch(self, start: date, end: date) -> dict[tuple[date, str], Figures]:
        figures: dict[tuple[date, str], Figures] = {}
        for path in ("/organization/usage/completions", "/organization/usage/embeddings"):
            for bucket_day, result in await self._buckets(path, start, end, group_by="model"):
                model = _our_model(result.get("model"))
                if model is None:
                    continue
                entry = figures.setdefault((bucket_day, model), Figures())
                entry.requests += _count(result.get("num_model_requests", 0))
                entry.input_tokens += _count(result.get("input_tokens", 0))
                entry.output_tokens += _count(result.get("output_tokens", 0))
                entry.has_tokens = True
        for bucket_day, result in await self._buckets("/organization/costs", start, end, group_by="line_item"):
            model = _our_model(str(result.get("line_item") or "").split(",", 1)[0].strip())
            if model is None:
                continue
            amount = result.get("amount")
            if not isinstance(amount, dict) or str(amount.get("currency", "usd")).lower() != "usd":
                raise MalformedReport("a cost without a USD amount")
            value = amount.get("value")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise MalformedReport("a cost that is not a number")
            entry = figures.setdefault((bucket_day, model), Figures())
            entry.cost_microusd += round(value * MICROUSD_PER_USD)
            entry.has_cost = True
        return figures

    async def _buckets(self, path: str, start: date, end: date, *, group_by: str) -> list[tuple[date, dict[str, Any]]]:
        from shared.gateway import provider

        params: dict[str, Any] = {
            "start_time": _epoch(start),
            "end_time": _epoch(end),
            "bucket_width": "1d",
            "group_by": group_by,
            "limit": PAGE_LIMIT,
        }
        found: list[tuple[date, dict[str, Any]]] = []
        for _ in range(MAX_PAGES):
            raw = await provider.fetch_organization_report(
                admin_key=self.admin_key,
                base_url=self.base_url,
                path=path,
                params=params,
                timeout_seconds=self.timeout_seconds,
            )
            page = _page(raw)
            for bucket in page["data"]:
                bucket_day = datetime.fromtimestamp(_count(bucket.get("start_time")), UTC).date()
                results = bucket.get("results")
                if not isinstance(results, list):
                    raise MalformedReport("a bucket without results")
                found.extend((bucket_day, result) for result in results if isinstance(result, dict))
            cursor = page.get("next_page")
            if not page.get("has_more") or not isinstance(cursor, str) or not cursor:
                return found
            params = {**params, "page": cursor}
        raise MalformedReport("the report did not end")


def platform_source() -> OpenAIOrganization | None:
    """The platform organization's source; ``None`` without an admin key (nothing to compare)."""
    settings = get_settings()
    admin_key = settings.openai_admin_key.get_secret_value().strip()
    if not admin_key:
        return None
    return OpenAIOrganization(admin_key, settings.openai_base_url)


def _page(raw: bytes) -> dict[str, Any]:
    try:
        page = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedReport("the report is not JSON") from None
    if not isinstance(page, dict) or not isinstance(page.get("data"), list):
        raise MalformedReport("the report has no data")
    if not all(isinstance(bucket, dict) for bucket in page["data"]):
        raise MalformedReport("a bucket is not an object")
    return page


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedReport("a count is not a non-negative integer")
    return value


def _epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def _our_model(name: object) -> str | None:
    """The priced model a provider's model name bills as (a dated snapshot counts as its model)."""
    if not isinstance(name, str) or not name:
        return None
    base = _SNAPSHOT.sub("", name.strip())
    return base if base in PRICES and base != OFFLINE_MODEL else None


# -- ours, and the comparison ---------------------------------------------------------------------

_METERED = """
select (u.created_at at time zone 'UTC')::date as day,
       u.model,
       count(*) as requests,
       coalesce(sum(u.prompt_tokens), 0)::bigint as input_tokens,
       coalesce(sum(u.completion_tokens), 0)::bigint as output_tokens,
       coalesce(sum(u.cost_microusd), 0)::bigint as cost_microusd,
       coalesce(sum(u.cost_microusd) filter (where u.estimated), 0)::bigint as estimated_cost_microusd
  from public.usage_events as u
 where u.created_at >= {start}
   and u.created_at < {end}
   and u.outcome <> 'rejected'
   and u.model <> {offline}
   and ({covers})
 group by 1, 2
"""

_INSERT = """
insert into private.usage_reconciliations
  (run_id, source, day, model, metered_requests, metered_input_tokens, metered_output_tokens,
   metered_cost_microusd, estimated_cost_microusd, provider_requests, provider_input_tokens,
   provider_output_tokens, provider_cost_microusd, token_drift, cost_drift, status)
select %(run_id)s, %(source)s, r.day, r.model, r.metered_requests, r.metered_input_tokens,
       r.metered_output_tokens, r.metered_cost_microusd, r.estimated_cost_microusd, r.provider_requests,
       r.provider_input_tokens, r.provider_output_tokens, r.provider_cost_microusd, r.token_drift,
       r.cost_drift, r.status
  from jsonb_to_recordset(%(rows)s::jsonb) as r(
    day date, model text, metered_requests bigint, metered_input_tokens bigint, metered_output_tokens bigint,
    metered_cost_microusd bigint, estimated_cost_microusd bigint, provider_requests bigint,
    provider_input_tokens bigint, provider_output_tokens bigint, provider_cost_microusd bigint,
    token_drift double precision, cost_drift double precision, status text)
"""


async def metered(db: Database, source: UsageSource, start: date, end: date) -> dict[tuple[date, str], Metered]:
    """Our sums per UTC day and model for ``start`` <= day < ``end``, computed in Postgres.

    One statement per day, each its own transaction: a day's rows are a bounded range of the
    ``created_at`` index, so no statement runs into the connection's statement timeout however many
    days a run covers, and a long run holds no snapshot open across days.
    """
    from psycopg import sql

    sums: dict[tuple[date, str], Metered] = {}
    day = start
    while day < end:
        following = day + timedelta(days=1)
        query = sql.SQL(_METERED).format(
            start=sql.Literal(datetime(day.year, day.month, day.day, tzinfo=UTC)),
            end=sql.Literal(datetime(following.year, following.month, following.day, tzinfo=UTC)),
            offline=sql.Literal(OFFLINE_MODEL),
            covers=source.covers(),
        )
        async with as_service(db) as conn, conn.cursor() as cur:
            await cur.execute(query)
            rows = await cur.fetchall()
        for row in rows:
            sums[(row["day"], row["model"])] = Metered(
                int(row["requests"]),
                int(row["input_tokens"]),
                int(row["output_tokens"]),
                int(row["cost_microusd"]),
                int(row["estimated_cost_microusd"]),
            )
        day = following
    return sums


def compare(ours: Mapping[tuple[date, str], Metered], theirs: Mapping[tuple[date, str], Figures]) -> list[Result]:
    """One result per day and model either side has, in order."""
    nothing = Metered(0, 0, 0, 0, 0)
    results: list[Result] = []
    for key in sorted(set(ours) | set(theirs)):
        mine, provider = ours.get(key, nothing), theirs.get(key)
        if provider is None:
            results.append(Result(key[0], key[1], mine, None, None, None, "missing"))
            continue
        token_drift = _drift(mine.tokens, provider.tokens) if provider.has_tokens else None
        cost_drift = _drift(mine.cost_microusd, provider.cost_microusd) if provider.has_cost else None
        drifts = [abs(d) for d in (token_drift, cost_drift) if d is not None]
        status: Status = "missing" if not drifts else "drift" if max(drifts) > DRIFT_THRESHOLD else "agree"
        results.append(Result(key[0], key[1], mine, provider, token_drift, cost_drift, status))
    return results


def _drift(ours: int, theirs: int) -> float:
    if theirs == 0:
        return 0.0 if ours == 0 else float("inf")
    return (ours - theirs) / theirs


async def reconcile(
    db: Database, source: UsageSource, *, today: date | None = None, days: int = DAYS_CHECKED, request_id: str = ""
) -> Report:
    """Compare the last ``days`` complete UTC days for ``source``, store and log the results."""
    end = today or datetime.now(UTC).date()
    start = end - timedelta(days=days)
    ours = await metered(db, source, start, end)
    theirs = await source.fetch(start, end)
    report = Report(uuid.uuid4(), source.source, compare(ours, theirs))
    await _store(db, report, start, end)
    for result in report.results:
        if result.status == "drift":
            log_event(
                "metered usage drifts from the provider's figures",
                logging.WARNING,
                **{
                    DECISION_REASON: "metering-drift",
                    "request_id": request_id,
                    "source": report.source,
                    "day": result.day.isoformat(),
                    "model": result.model,
                    "token_drift": _printable(result.token_drift),
                    "cost_drift": _printable(result.cost_drift),
                    "estimated_cost_microusd": result.metered.estimated_cost_microusd,
                },
            )
    return report


def _printable(drift: float | None) -> float | str | None:
    if drift is None or drift in (float("inf"), float("-inf")):
        return None if drift is None else "unbounded"
    return round(drift, 4)


_RUN = """
insert into private.usage_reconciliation_runs (id, source, first_day, last_day, checked, drifting)
values (%(run_id)s, %(source)s, %(first_day)s, %(last_day)s, %(checked)s, %(drifting)s)
"""


async def _store(db: Database, report: Report, start: date, end: date) -> None:
    rows = [_row(result) for result in report.results]
    run = {
        "run_id": report.run_id,
        "source": report.source,
        "first_day": start,
        "last_day": end - timedelta(days=1),
        "checked": len(rows),
        "drifting": sum(row["status"] == "drift" for row in rows),
    }
    async with as_service(db) as conn:
        if rows:
            await conn.execute(_INSERT, {"run_id": report.run_id, "source": report.source, "rows": json.dumps(rows)})
        await conn.execute(_RUN, run)


def _row(result: Result) -> dict[str, Any]:
    provider = result.provider
    return {
        "day": result.day.isoformat(),
        "model": result.model,
        "metered_requests": result.metered.requests,
        "metered_input_tokens": result.metered.input_tokens,
        "metered_output_tokens": result.metered.output_tokens,
        "metered_cost_microusd": result.metered.cost_microusd,
        "estimated_cost_microusd": result.metered.estimated_cost_microusd,
        "provider_requests": provider.requests if provider and provider.has_tokens else None,
        "provider_input_tokens": provider.input_tokens if provider and provider.has_tokens else None,
        "provider_output_tokens": provider.output_tokens if provider and provider.has_tokens else None,
        "provider_cost_microusd": provider.cost_microusd if provider and provider.has_cost else None,
        "token_drift": _storable(result.token_drift),
        "cost_drift": _storable(result.cost_drift),
        "status": result.status,
    }


def _storable(drift: float | None) -> float | None:
    # JSON has no infinity: provider figures of 0 against ours are stored as a null drift, status drift.
    return None if drift is None or drift in (float("inf"), float("-inf")) else drift


# -- health -----------------------------------------------------------------------------------------

_LATEST = """
select distinct on (source, day, model) source, day, model, status
  from private.usage_reconciliations
 where checked_at > now() - make_interval(days => %(days)s)
 order by source, day, model, checked_at desc, id desc
"""
_LAST_RUN = "select max(finished_at) from private.usage_reconciliation_runs"


@dataclass(frozen=True, slots=True)
class MeteringHealth:
    status: Literal["ok", "drift", "stale"]
    checked_at: datetime | None
    drifting: int
    missing: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
            "drifting": self.drifting,
            "missing": self.missing,
        }


async def metering_health(db: Database, *, now: datetime | None = None) -> MeteringHealth:
    """The latest result of each day and model checked in the last week: ``drift`` when any drifts,
    ``stale`` when no run has finished within ``STALE_AFTER`` (the job stopped), else ``ok``."""
    async with as_service(db) as conn, conn.cursor() as cur:
        await cur.execute(_LATEST, {"days": 7})
        rows = await cur.fetchall()
        await cur.execute(_LAST_RUN)
        last = await cur.fetchone()
    latest: datetime | None = last["max"] if last else None
    drifting = sum(row["status"] == "drift" for row in rows)
    missing = sum(row["status"] == "missing" for row in rows)
    current = now or datetime.now(UTC)
    if drifting:
        status: Literal["ok", "drift", "stale"] = "drift"
    elif latest is None or current - latest > STALE_AFTER:
        status = "stale"
    else:
        status = "ok"
    return MeteringHealth(status, latest, drifting, missing)
