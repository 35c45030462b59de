"""The usage reconciliation against a loopback server speaking OpenAI's documented admin usage API.

Our side is real ``usage_events`` rows in the real Postgres; the provider's side is the fake's
``/v1/organization/usage/*`` and ``/v1/organization/costs`` pages, reached through the settings
(``OPENAI_BASE_URL``, ``OPENAI_ADMIN_KEY``) as in production. Days are in the past, away from what
other tests write today.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from shared.pricing import cost_microusd
from shared.reconciliation import platform_source, reconcile
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import Connection, TransactionDatabase
from tests.factories import create_org
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

TODAY = date(2026, 6, 4)
DAYS = [TODAY - timedelta(days=n) for n in (3, 2, 1)]
CALLS = {"gpt-4o-mini": (40, 1200, 150), "text-embedding-3-small": (10, 800, 0)}
"""model: (calls a day, prompt tokens a call, completion tokens a call)."""


@pytest.fixture(scope="module")
def fake_openai() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        yield fake


@pytest.fixture
def provider(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    fake_openai.reset()
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.base_url)
    monkeypatch.setenv("OPENAI_ADMIN_KEY", fake_openai.admin_key)
    monkeypatch.setenv("CRON_SECRET", "cron-secret-for-tests-0123456789abcdef")
    get_settings.cache_clear()
    yield fake_openai
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def tdb(db: Connection) -> TransactionDatabase:
    return TransactionDatabase(db)


def epoch(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


async def meter(db: Connection, org: dict[str, Any]) -> dict[tuple[date, str], tuple[int, int, int]]:
    """Usage rows for every day and model of ``CALLS``; returns (prompt, completion, cost) sums."""
    await db.execute("reset role")
    sums: dict[tuple[date, str], tuple[int, int, int]] = {}
    for day in DAYS:
        for model, (calls, prompt, completion) in CALLS.items():
            cost = cost_microusd(model, prompt_tokens=prompt, completion_tokens=completion)
            kind = "embedding" if completion == 0 else "chat"
            for i in range(calls):
                created = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(minutes=30 * i)
                await db.execute(
                    "insert into public.usage_events (org_id, kind, model, prompt_tokens, completion_tokens,"
                    " cost_microusd, outcome, request_id, created_at) values (%s, %s, %s, %s, %s, %s, 'ok', %s, %s)",
                    (org["id"], kind, model, prompt, completion, cost, f"req-{i}", created),
                )
            # A refused call and an offline answer are not the provider's business.
            await db.execute(
                "insert into public.usage_events (org_id, kind, model, outcome, created_at)"
                " values (%s, 'chat', %s, 'rejected', %s)",
                (org["id"], model, datetime(day.year, day.month, day.day, 12, tzinfo=UTC)),
            )
            sums[(day, model)] = (calls * prompt, calls * completion, calls * cost)
        await db.execute(
            "insert into public.usage_events (org_id, kind, model, prompt_tokens, outcome, created_at)"
            " values (%s, 'chat', 'offline', 99, 'ok', %s)",
            (org["id"], datetime(day.year, day.month, day.day, 13, tzinfo=UTC)),
        )
    return sums


def publish(
    fake: FakeOpenAI,
    sums: dict[tuple[date, str], tuple[int, int, int]],
    *,
    scale: dict[tuple[date, str], float] | None = None,
    skip_days: tuple[date, ...] = (),
) -> None:
    """The provider's report of ``sums``, scaled per day and model, under its dated model names."""
    scale = scale or {}
    completions: list[dict[str, Any]] = []
    embeddings: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    for day in DAYS:
        if day in skip_days:
            continue
        usage: dict[str, list[dict[str, Any]]] = {"chat": [], "embedding": []}
        cost_lines: list[dict[str, Any]] = []
        for (sum_day, model), (prompt, completion, cost) in sums.items():
            if sum_day != day:
                continue
            factor = scale.get((day, model), 1.0)
            snapshot = f"{model}-2024-07-18" if model.startswith("gpt") else model
            usage["embedding" if completion == 0 else "chat"].append(
                {
                    "object": "organization.usage.completions.result",
                    "input_tokens": round(prompt * factor),
                    "output_tokens": round(completion * factor),
                    "input_cached_tokens": 0,
                    "num_model_requests": CALLS.get(model, (1, 0, 0))[0],
                    "model": snapshot,
                    "project_id": None,
                    "user_id": None,
                    "api_key_id": None,
                    "batch": None,
                }
            )
            # Split in two line items, as the costs report does; the sum is the day's cost.
            in_part = cost * factor * 0.25 / 1_000_000
            out_part = cost * factor * 0.75 / 1_000_000
            cost_lines.append(_cost(f"{snapshot}, input", in_part))
            cost_lines.append(_cost(f"{snapshot}, output", out_part))
        bounds = {"object": "bucket", "start_time": epoch(day), "end_time": epoch(day + timedelta(days=1))}
        completions.append({**bounds, "results": usage["chat"]})
        embeddings.append({**bounds, "results": usage["embedding"]})
        costs.append({**bounds, "results": cost_lines})
    fake.organization_reports = {
        "/organization/usage/completions": completions,
        "/organization/usage/embeddings": embeddings,
        "/organization/costs": costs,
    }


def _cost(line_item: str, usd: float) -> dict[str, Any]:
    return {
        "object": "organization.costs.result",
        "amount": {"value": usd, "currency": "usd"},
        "line_item": line_item,
        "project_id": None,
    }


async def stored(db: Connection, run_id: uuid.UUID) -> dict[tuple[date, str], dict[str, Any]]:
    await db.execute("reset role")
    cur = await db.execute("select * from private.usage_reconciliations where run_id = %s", (run_id,))
    return {(row["day"], row["model"]): row for row in await cur.fetchall()}


async def ledger(db: Connection, org: dict[str, Any]) -> list[dict[str, Any]]:
    await db.execute("reset role")
    cur = await db.execute("select * from public.usage_events where org_id = %s order by id", (org["id"],))
    return await cur.fetchall()


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    return await create_org(db)


class TestReconcile:
    async def test_figures_that_agree_are_stored_as_agreeing_and_the_ledger_is_untouched(
        self, provider: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        sums = await meter(db, org)
        publish(provider, sums)
        before = await ledger(db, org)
        source = platform_source()
        assert source is not None

        report = await reconcile(tdb, source, today=TODAY)

        assert report.as_dict() == {"source": "openai-organization", "checked": 6, "agree": 6, "drift": 0, "missing": 0}
        rows = await stored(db, report.run_id)
        assert set(rows) == set(sums)
        for key, (prompt, completion, cost) in sums.items():
            row = rows[key]
            assert (row["metered_input_tokens"], row["metered_output_tokens"], row["metered_cost_microusd"]) == (
                prompt,
                completion,
                cost,
            )
            assert (row["provider_input_tokens"], row["provider_output_tokens"]) == (prompt, completion)
            assert abs(row["provider_cost_microusd"] - cost) <= 1
            assert row["metered_requests"] == CALLS[key[1]][0], "refused calls are not counted"
            assert (row["status"], row["token_drift"]) == ("agree", 0.0)
        assert await ledger(db, org) == before, "no metered row changed"
        assert all(params["bucket_width"] == "1d" for _, params in provider.report_requests)
        assert {params["group_by"] for path, params in provider.report_requests if "usage" in path} == {"model"}

    async def test_a_drift_either_way_is_flagged_logged_and_stored(
        self,
        provider: FakeOpenAI,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        log_lines: list[str],
    ) -> None:
        sums = await meter(db, org)
        over, under = (DAYS[0], "gpt-4o-mini"), (DAYS[1], "text-embedding-3-small")
        # The provider billed less than we metered (we over-charge), and more (calls went unmetered).
        publish(provider, sums, scale={over: 0.95, under: 1.05})
        source = platform_source()
        assert source is not None

        report = await reconcile(tdb, source, today=TODAY, request_id="req-recon")

        rows = await stored(db, report.run_id)
        assert rows[over]["status"] == rows[under]["status"] == "drift"
        assert rows[over]["token_drift"] == pytest.approx(1 / 0.95 - 1, abs=1e-6)
        assert rows[over]["cost_drift"] == pytest.approx(1 / 0.95 - 1, abs=1e-4)
        assert rows[under]["token_drift"] == pytest.approx(1 / 1.05 - 1, abs=1e-6)
        assert rows[under]["token_drift"] < 0 < rows[over]["token_drift"]
        assert sum(row["status"] == "agree" for row in rows.values()) == 4
        drifts = [json.loads(line) for line in log_lines if "metering-drift" in line]
        assert sorted((d["day"], d["model"]) for d in drifts) == sorted(
            [(over[0].isoformat(), over[1]), (under[0].isoformat(), under[1])]
        )
        assert all(d["level"] == "warning" and d["request_id"] == "req-recon" for d in drifts)

    async def test_a_drift_within_the_threshold_agrees(
        self, provider: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        sums = await meter(db, org)
        publish(provider, sums, scale={(DAYS[0], "gpt-4o-mini"): 1.015})
        source = platform_source()
        assert source is not None

        report = await reconcile(tdb, source, today=TODAY)

        assert report.as_dict()["drift"] == 0

    async def test_a_day_the_provider_has_no_figures_for_is_missing_not_a_drift(
        self, provider: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        sums = await meter(db, org)
        publish(provider, sums, skip_days=(DAYS[2],))
        source = platform_source()
        assert source is not None

        report = await reconcile(tdb, source, today=TODAY)

        rows = await stored(db, report.run_id)
        assert {key: row["status"] for key, row in rows.items() if key[0] == DAYS[2]} == {
            (DAYS[2], "gpt-4o-mini"): "missing",
            (DAYS[2], "text-embedding-3-small"): "missing",
        }
        assert rows[(DAYS[2], "gpt-4o-mini")]["provider_input_tokens"] is None
        assert report.as_dict()["agree"] == 4

    async def test_usage_the_provider_reports_that_we_never_metered_is_a_drift(
        self, provider: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        sums = await meter(db, org)
        publish(provider, {**sums, (DAYS[1], "gpt-4o"): (5000, 500, 17_500)})
        source = platform_source()
        assert source is not None

        report = await reconcile(tdb, source, today=TODAY)

        row = (await stored(db, report.run_id))[(DAYS[1], "gpt-4o")]
        assert (row["status"], row["metered_input_tokens"], row["provider_input_tokens"]) == ("drift", 0, 5000)

    async def test_every_page_of_a_report_is_read(
        self, provider: FakeOpenAI, tdb: TransactionDatabase, db: Connection, org: dict[str, Any]
    ) -> None:
        sums = await meter(db, org)
        publish(provider, sums)
        provider.page_size = 1  # three days: three pages of each report
        source = platform_source()
        assert source is not None

        report = await reconcile(tdb, source, today=TODAY)

        assert report.as_dict()["agree"] == 6
        pages = [params.get("page") for path, params in provider.report_requests if path == "/organization/costs"]
        assert pages == [None, "1", "2"]


class TestHealthAndCron:
    @pytest.fixture
    async def client(self, db: Connection) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
        import importlib

        apps: list[FastAPI] = [
            importlib.import_module("functions.health").app,
            importlib.import_module("functions.cron_reconcile").app,
        ]
        for app in apps:
            app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
        try:
            async with (
                httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[0]), base_url="https://x.test") as health,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[1]), base_url="https://x.test") as cron,
            ):
                yield health, cron
        finally:
            for app in apps:
                app.dependency_overrides.clear()

    async def test_the_cron_path_refuses_anyone_but_the_scheduler(
        self, provider: FakeOpenAI, client: tuple[httpx.AsyncClient, httpx.AsyncClient]
    ) -> None:
        _, cron = client
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await cron.get("/api/cron/reconcile", headers=headers)
            assert response.status_code == 401
            assert response.headers["content-type"] == "application/problem+json"
        assert provider.report_requests == []

    async def test_the_metering_health_check_says_stale_then_drift_until_a_run_agrees(
        self,
        provider: FakeOpenAI,
        tdb: TransactionDatabase,
        db: Connection,
        org: dict[str, Any],
        client: tuple[httpx.AsyncClient, httpx.AsyncClient],
    ) -> None:
        health, cron = client
        await db.execute("reset role")
        await db.execute("delete from private.usage_reconciliations")
        await db.execute("delete from private.usage_reconciliation_runs")
        stale = await health.get("/api/health/metering")
        assert (stale.status_code, stale.json()["status"]) == (200, "stale"), "never ran: someone should know"

        today = datetime.now(UTC).date()
        await db.execute(
            "insert into public.usage_events (org_id, kind, model, prompt_tokens, completion_tokens,"
            " cost_microusd, outcome, created_at) values (%s, 'chat', 'gpt-4o-mini', 1000, 100, 210, 'ok', %s)",
            (org["id"], datetime.now(UTC) - timedelta(days=1)),
        )
        yesterday = today - timedelta(days=1)
        provider.organization_reports = {
            "/organization/usage/completions": [
                {
                    "object": "bucket",
                    "start_time": epoch(yesterday),
                    "end_time": epoch(today),
                    "results": [
                        {"input_tokens": 2000, "output_tokens": 200, "num_model_requests": 2, "model": "gpt-4o-mini"}
                    ],
                }
            ]
        }
        secret = {"Authorization": "Bearer cron-secret-for-tests-0123456789abcdef"}
        ran = await cron.get("/api/cron/reconcile", headers=secret)
        assert ran.status_code == 200, ran.text
        assert ran.json()["drift"] >= 1

        drifting = await health.get("/api/health/metering")
        assert drifting.status_code == 200
        body = drifting.json()
        assert body["status"] == "drift"
        assert body["drifting"] >= 1
        assert set(body) == {"status", "checked_at", "drifting", "missing"}, "counts only, no figures"

        provider.organization_reports["/organization/usage/completions"][0]["results"][0].update(
            input_tokens=1000, output_tokens=100, num_model_requests=1
        )
        again = await cron.get("/api/cron/reconcile", headers=secret)
        assert again.status_code == 200
        healthy = await health.get("/api/health/metering")
        assert healthy.status_code == 200, healthy.text
        assert healthy.json()["status"] == "ok"
