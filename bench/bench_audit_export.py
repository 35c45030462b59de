"""Audit-log export: rows per second against ``COPY … TO STDOUT`` of the same rows, and peak memory.

Builds one organization with 1,000,000 audit rows (about 300 bytes each as NDJSON) in a fresh
embedded database, then, alternating so machine noise hits each alike:

- baseline: ``COPY (select <the same columns, same rows, same order>) TO STDOUT (FORMAT csv)`` as
  the superuser, every byte read;
- the export, NDJSON and CSV, through ``open_export`` as the organization's owner (row-level
  security on, keyset pages, hashing, checkpoints, audit events), every byte read.

Then peak memory, each size in a fresh interpreter: the export of the first 100,000 rows and of all
1,000,000, streamed into a hash (Python's tracemalloc peak, and the process's max RSS).

    .venv/bin/python bench/bench_audit_export.py [--rows 1000000] [--rounds 3]

Target: export time at most 2x COPY's; peak memory the same at both sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from shared.local.database import apply_schema, create_database, start_server

if TYPE_CHECKING:
    from shared.audit.export import ExportFormat

DB = "bench_audit_export"
COPY = """
copy (select id, created_at, actor, actor_user_id, action, target_type, target_id, details, request_id
        from public.audit_log
       where org_id = '{org}' and created_at >= '{start}' and created_at < '{end}'
       order by created_at, id) to stdout (format csv)
"""


def build(admin_url: str, rows: int) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        user = uuid.uuid4()
        conn.execute(
            "insert into auth.users (id, aud, role, email) values (%s, 'authenticated', 'authenticated', 'o@b.test')",
            (user,),
        )
        org = conn.execute(
            "insert into public.organizations (name, created_by) values ('Bench', %s) returning id", (user,)
        ).fetchone()
        assert org is not None
        conn.execute(
            "insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details,"
            " request_id, created_at)"
            " select %s, %s, 'connections-api', 'connection.verified', 'connection', gen_random_uuid()::text,"
            "        jsonb_build_object('kind', 'slack_webhook', 'name', 'Support ' || g, 'result', 'active'),"
            "        'req_' || left(md5(g::text), 24), timestamptz '2026-01-01' + g * interval '10 ms'"
            "   from generate_series(1, %s) g",
            (org[0], user, rows),
        )
        conn.execute("vacuum analyze public.audit_log")


def context(admin_url: str) -> tuple[str, str, datetime, list[datetime]]:
    with psycopg.connect(admin_url) as conn:
        org, user = conn.execute("select id, created_by from public.organizations where name = 'Bench'").fetchone()  # type: ignore[misc]
        bounds = conn.execute(
            "select min(created_at), max(created_at) from public.audit_log where action = 'connection.verified'"
        ).fetchone()
        assert bounds is not None
        return str(org), str(user), bounds[0], [bounds[1]]


def end_after(admin_url: str, org: str, start: datetime, rows: int) -> datetime:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "select created_at from public.audit_log where org_id = %s and created_at >= %s"
            " order by created_at, id offset %s limit 1",
            (org, start, rows),
        ).fetchone()
        return row[0] if row else datetime.now(UTC)


def run_copy(admin_url: str, org: str, start: datetime, end: datetime) -> tuple[int, float]:
    started = time.perf_counter()
    lines = 0
    with psycopg.connect(admin_url) as conn, conn.cursor() as cur:
        query = COPY.format(org=org, start=start.isoformat(), end=end.isoformat())
        with cur.copy(query) as copy:
            for data in copy:
                lines += bytes(data).count(b"\n")
    return lines, time.perf_counter() - started


async def run_export(org: str, user: str, start: datetime, end: datetime, fmt: ExportFormat) -> tuple[int, float, str]:
    from shared.audit.export import open_export
    from shared.db.session import get_database

    claims = {"sub": user, "aud": "authenticated", "role": "authenticated"}
    started = time.perf_counter()
    export = await open_export(
        get_database(),
        claims,
        org_id=uuid.UUID(org),
        start=start,
        end=end,
        fmt=fmt,
        request_id=None,
    )
    digest = hashlib.sha256()
    last = b""
    async for chunk in export.body:
        digest.update(chunk)
        last = chunk
    elapsed = time.perf_counter() - started
    trailer = last.decode().strip().splitlines()[-1]
    rows = json.loads(trailer)["rows"] if fmt == "ndjson" else int(trailer.split("rows=")[1].split(",")[0])
    return rows, elapsed, digest.hexdigest()


def memory_child(org: str, user: str, start: str, end: str) -> None:
    """In a fresh interpreter: one NDJSON export, then its rows and its memory peaks as JSON."""
    tracemalloc.start()

    async def go() -> int:
        from shared.db.pool import close_pools

        rows, _, _ = await run_export(org, user, datetime.fromisoformat(start), datetime.fromisoformat(end), "ndjson")
        await close_pools()
        return rows

    rows = asyncio.run(go())
    _, peak = tracemalloc.get_traced_memory()
    print(
        json.dumps(
            {
                "rows": rows,
                "tracemalloc_peak_mib": peak / 2**20,
                "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-child", nargs=4, metavar=("ORG", "USER", "START", "END"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-pg")
    admin = server.url(DB)
    with psycopg.connect(server.url(), autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (DB,)).fetchone()
    built = False
    if exists:
        with psycopg.connect(admin) as conn:
            count = conn.execute(
                "select count(*) from public.audit_log where action = 'connection.verified'"
            ).fetchone()
        built = count is not None and count[0] == args.rows
    if not built:
        create_database(server, DB, replace=True)
        apply_schema(admin, seed=False)
        started = time.perf_counter()
        build(admin, args.rows)
        print(f"built {args.rows:,} audit rows in {time.perf_counter() - started:.1f} s")
    os.environ["DATABASE_URL"] = server.url(DB, user="authenticator")
    org, user, start, (last,) = context(admin)
    end = end_after(admin, org, start, args.rows)
    if end <= last:
        end = datetime.fromtimestamp(last.timestamp() + 0.001, UTC)

    async def timed() -> dict[str, list[float]]:
        from shared.db.pool import close_pools

        rates: dict[str, list[float]] = {"copy": [], "ndjson": [], "csv": []}
        for _ in range(args.rounds):
            rows, elapsed = run_copy(admin, org, start, end)
            assert rows == args.rows, f"copy saw {rows} rows"
            rates["copy"].append(rows / elapsed)
            fmt: ExportFormat
            for fmt in ("ndjson", "csv"):
                rows, elapsed, _ = await run_export(org, user, start, end, fmt)
                assert rows == args.rows, f"{fmt} saw {rows} rows"
                rates[fmt].append(rows / elapsed)
        await close_pools()
        return rates

    rates = asyncio.run(timed())
    copy_rate = statistics.median(rates["copy"])
    print(f"rows: {args.rows:,}, rounds: {args.rounds} (alternating), median rows/s:")
    print(f"  COPY ... TO STDOUT (csv):  {copy_rate:,.0f}")
    for kind in ("ndjson", "csv"):
        rate = statistics.median(rates[kind])
        print(f"  export {kind:6}:            {rate:,.0f}  -> time {copy_rate / rate:.2f}x COPY's (target <= 2x)")

    print("peak memory of one NDJSON export, each in a fresh interpreter:")
    for size in (args.rows // 10, args.rows):
        size_end = end_after(admin, org, start, size)
        if size == args.rows:
            size_end = end
        out = (
            subprocess.run(  # noqa: S603
                [sys.executable, __file__, "--memory-child", org, user, start.isoformat(), size_end.isoformat()],
                capture_output=True,
                text=True,
                check=True,
                env=os.environ,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        figures = json.loads(out)
        print(
            f"  {figures['rows']:>9,} rows: tracemalloc peak {figures['tracemalloc_peak_mib']:.1f} MiB,"
            f" max RSS {figures['max_rss_mib']:.1f} MiB"
        )


if __name__ == "__main__":
    main()
