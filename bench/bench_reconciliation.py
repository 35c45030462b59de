"""The usage reconciliation over 30 days of 5 models: time and the job's peak memory, at the full
row count and at a tenth of it side by side (bounded memory: the job's peak does not grow with the
rows, because the sums run in Postgres).

* Postgres: the embedded server, a fresh database with the migrations, ``usage_events`` filled by
  ``generate_series``: ``--rows`` rows per model per day (default 100,000) over 30 days for five
  models (four priced ones and ``offline``, which the job reads past), and a tenth of that over
  another 30 days. ``vacuum analyze`` after the load, as autovacuum would.
* The provider: the loopback server of the tests, serving the admin usage and costs reports for
  those days (one bucket a day, a result per model), paged as the API pages them.
* Each reconciliation runs in a process of its own (``reconcile`` with ``days=30``: the SQL sums,
  every page of the three reports, the comparison, the stored results); it reports its wall time
  and its peak resident memory (``ru_maxrss``), and the resident memory it had before the job
  started (imports and the running fake), so the job's own share shows. The two sizes alternate
  (``--rounds``).

From the repo root:

    PYTHONPATH=. .venv/bin/python bench/bench_reconciliation.py [--rows 100000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

MODELS = {  # model: (prompt, completion) tokens per row
    "gpt-4o-mini": (1200, 150),
    "gpt-4o": (900, 120),
    "gpt-4.1-mini": (1000, 200),
    "text-embedding-3-small": (400, 0),
    "offline": (300, 60),
}
DAYS = 30
FULL_END = date(2026, 10, 1)
TENTH_END = date(2025, 10, 1)
DATA_DIR = Path(tempfile.gettempdir()) / "hiredhands-bench-reconcile-pg"
DB_NAME = "hh_bench_reconcile"
_SERVERS: list[Any] = []


def _load(rows_per_day: int, *, reuse: bool) -> str:
    import psycopg

    from shared.local.database import apply_schema, create_database, start_server
    from shared.pricing import cost_microusd

    server = start_server(DATA_DIR)
    _SERVERS.append(server)  # the embedded server stops when its last handle goes
    expected = rows_per_day * DAYS * len(MODELS) + rows_per_day // 10 * DAYS * len(MODELS)
    if reuse:
        try:
            with psycopg.connect(server.url(DB_NAME), autocommit=True) as conn:
                apply_schema(server.url(DB_NAME), seed=False)
                found = conn.execute("select count(*) from public.usage_events").fetchone()
            if found and found[0] == expected:
                print(f"reusing {found[0]:,} usage rows", flush=True)
                _in_time_order(server.url(DB_NAME))
                return server.url(DB_NAME, user="authenticator")
        except psycopg.OperationalError:
            pass
    create_database(server, DB_NAME, replace=True)
    admin_url = server.url(DB_NAME)
    apply_schema(admin_url, seed=False)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        user_id = uuid.uuid4()
        conn.execute(
            "insert into auth.users (id, aud, role, email) values (%s, 'authenticated', 'authenticated', %s)",
            (user_id, f"{user_id.hex[:8]}@bench.example"),
        )
        row = conn.execute(
            "insert into public.organizations (name, created_by) values ('Bench Co', %s) returning id", (user_id,)
        ).fetchone()
        assert row is not None
        org_id = row[0]
        started = time.perf_counter()
        for end, per_day in ((FULL_END, rows_per_day), (TENTH_END, rows_per_day // 10)):
            for model, (prompt, completion) in MODELS.items():
                cost = (
                    0
                    if model == "offline"
                    else cost_microusd(model, prompt_tokens=prompt, completion_tokens=completion)
                )
                kind = "embedding" if completion == 0 else "chat"
                conn.execute(
                    "insert into public.usage_events (org_id, kind, model, prompt_tokens, completion_tokens,"
                    " cost_microusd, outcome, created_at)"
                    " select %(org)s, %(kind)s, %(model)s, %(prompt)s, %(completion)s, %(cost)s, 'ok',"
                    "        %(start)s::timestamptz + (i %% %(days)s) * interval '1 day'"
                    "        + (i / %(days)s) * (interval '86399 seconds' / %(per_day)s)"
                    "   from generate_series(0, %(n)s - 1) as i",
                    {
                        "org": org_id,
                        "kind": kind,
                        "model": model,
                        "prompt": prompt,
                        "completion": completion,
                        "cost": cost,
                        "start": datetime(end.year, end.month, end.day, tzinfo=UTC) - timedelta(days=DAYS),
                        "days": DAYS,
                        "per_day": per_day,
                        "n": per_day * DAYS,
                    },
                )
        count = conn.execute("select count(*) from public.usage_events").fetchone()
        print(f"loaded {count[0] if count else 0:,} usage rows in {time.perf_counter() - started:.0f}s", flush=True)
    _in_time_order(admin_url)
    return server.url(DB_NAME, user="authenticator")


def _in_time_order(admin_url: str) -> None:
    """Rows in the order production writes them (by time): ``generate_series`` wrote each model's
    30 days interleaved, which would scatter a day's rows over the whole table."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        done = conn.execute(
            "select indisclustered from pg_index where indexrelid = 'public.usage_events_created_at_idx'::regclass"
        ).fetchone()
        if done and done[0]:
            return
        started = time.perf_counter()
        conn.execute("cluster public.usage_events using usage_events_created_at_idx")
        conn.execute("vacuum analyze public.usage_events")
        print(f"rows put in time order in {time.perf_counter() - started:.0f}s", flush=True)


async def _reconcile_once(app_url: str, end: date, per_day: int) -> dict[str, Any]:
    from tests.fakes.openai_server import start_fake_openai

    fake = start_fake_openai()
    buckets: dict[str, list[dict[str, Any]]] = {
        "/organization/usage/completions": [],
        "/organization/usage/embeddings": [],
        "/organization/costs": [],
    }
    from shared.pricing import cost_microusd

    for n in range(DAYS):
        day = end - timedelta(days=DAYS - n)
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        usage: dict[str, list[dict[str, Any]]] = {"chat": [], "embedding": []}
        costs = []
        for model, (prompt, completion) in MODELS.items():
            if model == "offline":
                continue
            usage["embedding" if completion == 0 else "chat"].append(
                {
                    "input_tokens": prompt * per_day,
                    "output_tokens": completion * per_day,
                    "num_model_requests": per_day,
                    "model": model,
                }
            )
            cost = cost_microusd(model, prompt_tokens=prompt, completion_tokens=completion) * per_day
            costs.append({"amount": {"value": cost / 1_000_000, "currency": "usd"}, "line_item": f"{model}, input"})
        bounds = {"object": "bucket", "start_time": start, "end_time": start + 86400}
        buckets["/organization/usage/completions"].append({**bounds, "results": usage["chat"]})
        buckets["/organization/usage/embeddings"].append({**bounds, "results": usage["embedding"]})
        buckets["/organization/costs"].append({**bounds, "results": costs})
    fake.organization_reports = buckets
    os.environ.update(DATABASE_URL=app_url, OPENAI_BASE_URL=fake.base_url, OPENAI_ADMIN_KEY=fake.admin_key)

    from shared.db.pool import close_pools
    from shared.db.session import get_database
    from shared.reconciliation import platform_source, reconcile

    source = platform_source()
    assert source is not None
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = await reconcile(get_database(), source, today=end, days=DAYS)
    elapsed = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await close_pools()
    fake.stop()
    return {
        "rows": per_day * DAYS * len(MODELS),
        "seconds": round(elapsed, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "rss_before_mib": round(before_kib / 1024, 1),
        "report": report.as_dict(),
        "pages": len(fake.report_requests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=100_000, help="usage rows per model per day")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep a database already loaded at this size")
    parser.add_argument("--once", nargs=3, metavar=("URL", "END", "PER_DAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        url, end, per_day = args.once
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the job's log lines (a failure's traceback is printed)
        try:
            print(json.dumps(asyncio.run(_reconcile_once(url, date.fromisoformat(end), int(per_day)))))
        except Exception as exc:
            print(json.dumps({"error": repr(exc)}))
            raise SystemExit(1) from None
        return

    app_url = _load(args.rows, reuse=args.reuse)
    sizes = {"tenth": (TENTH_END, args.rows // 10), "full": (FULL_END, args.rows)}
    results: dict[str, list[dict[str, Any]]] = {"tenth": [], "full": []}
    for round_ in range(args.rounds):
        for label in ("tenth", "full") if round_ % 2 == 0 else ("full", "tenth"):
            end, per_day = sizes[label]
            command = [sys.executable, __file__, "--once", app_url, end.isoformat(), str(per_day)]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)  # noqa: S603
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if "error" in result:
                raise SystemExit(f"{label}: {result['error']}")
            results[label].append(result)
            print(f"round {round_ + 1} {label:>5}: {json.dumps(result)}", flush=True)
    print()
    print(f"{'':>24} {'tenth':>12} {'full':>12} {'full/tenth':>11}")
    for key, label in (("rows", "usage rows"), ("seconds", "time (s)"), ("peak_rss_mib", "peak RSS (MiB)")):
        tenth, full = (statistics.median(r[key] for r in results[name]) for name in ("tenth", "full"))
        print(f"{label:>24} {tenth:>12,.1f} {full:>12,.1f} {full / tenth:>10.2f}x")
    growth = statistics.median(r["peak_rss_mib"] - r["rss_before_mib"] for r in results["full"])
    print(f"\nthe job's own peak (peak RSS - RSS before it started), full size: {growth:.1f} MiB")


if __name__ == "__main__":
    main()
