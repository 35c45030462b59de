"""Site scan throughput and memory against a plain loop.

A local site of N linked HTML pages (tests/fakes/site.py ``generated_site``) is served from its own
process. Two contestants, each run in a fresh process per round so that peak memory (the process's
maximum resident set size) belongs to one of them only:

* **scan**: a queued scan run by ``run_scans`` with the offline provider, exactly as the cron does:
  robots.txt, the egress guard, politeness 0 (one host, one request at a time), same-site links,
  de-duplication, extraction, chunking, and the database work (frontier, progress and chunks
  flushed every 8 pages, published at the end) against the embedded Postgres;
* **plain**: a loop of ``httpx.AsyncClient`` GETs over the same N URLs, known in advance, each page
  through the same extractor (``shared.scans.extract.extract_html``), nothing stored.

Rounds alternate which runs first. Prints pages per second and peak RSS for each, and the median
ratio of the scan's time to the plain loop's (target: under 1.3x). From the repository root:

    PYTHONPATH=. .venv/bin/python bench/bench_scan.py [--pages 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _serve_site(pages: int, ready: Connection, stop_after: float) -> None:
    from tests.fakes.site import generated_site, running_site

    with running_site(generated_site(pages)) as site:
        ready.send(site.port)
        time.sleep(stop_after)  # stops by itself even if the parent dies


# -- the contestants (child processes) ------------------------------------------------------------


async def _plain(port: int, pages: int) -> dict[str, float]:
    import httpx

    from shared.scans.extract import extract_html

    paths = ["/"] + [f"/p/{i}" for i in range(1, pages)]
    started = time.perf_counter()
    stored = 0
    async with httpx.AsyncClient(trust_env=False, timeout=15) as client:
        await client.get(f"http://127.0.0.1:{port}/robots.txt")
        for path in paths:
            response = await client.get(f"http://127.0.0.1:{port}{path}")
            response.raise_for_status()
            extracted = extract_html(response.content, response.headers["content-type"], url=str(response.url))
            stored += bool(extracted.text)
    return {"seconds": time.perf_counter() - started, "pages": stored}


async def _scan(port: int, pages: int, database_url: str, admin_url: str) -> dict[str, float]:
    os.environ["DATABASE_URL"] = database_url
    from psycopg import AsyncConnection
    from psycopg.rows import dict_row

    from shared.db.pool import close_pools
    from shared.db.session import get_database
    from shared.scans import ScanCreate, ScanEnvironment, create_scan, run_scans
    from shared.settings import get_settings
    from tests.factories import create_agent, create_org, user_claims
    from tests.fakes.site import FakeSite

    get_settings.cache_clear()
    async with await AsyncConnection.connect(admin_url, row_factory=dict_row, autocommit=True) as conn:
        org = await create_org(conn)
        agent = await create_agent(conn, org)
        await conn.execute(
            "update public.organization_limits set max_scan_pages = %s where org_id = %s", (pages, org["id"])
        )
    site = FakeSite({})
    site.port = port
    env = ScanEnvironment(
        policy=site.policy(),
        resolver=site.resolver(),
        politeness_seconds=0,
        time_budget_seconds=600,
        lease_seconds=600,
        concurrency=1,
    )
    db = get_database()
    body = ScanCreate(agent_id=agent["id"], start_url=site.url("/"), page_limit=pages, max_depth=20)
    scan = await create_scan(db, user_claims(org["owner"]), body, env=env, request_id=None)
    started = time.perf_counter()
    report = await run_scans(db, env=env)
    seconds = time.perf_counter() - started
    await close_pools()
    async with await AsyncConnection.connect(admin_url, row_factory=dict_row) as conn:
        row = await (await conn.execute("select * from public.scans where id = %s", (scan.id,))).fetchone()
    assert row is not None
    assert report.completed == 1, (report, row["status"])
    return {"seconds": seconds, "pages": row["pages_fetched"]}


def _child(args: argparse.Namespace) -> None:
    import logging

    logging.getLogger("hiredhands").setLevel(logging.WARNING)
    if args.child == "plain":
        result = asyncio.run(_plain(args.port, args.pages))
    else:
        result = asyncio.run(_scan(args.port, args.pages, args.database_url, args.admin_url))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sys.stdout.write(json.dumps(result) + "\n")


# -- the parent -----------------------------------------------------------------------------------


def _run(kind: str, port: int, pages: int, database_url: str, admin_url: str) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--child", kind, "--port", str(port), "--pages", str(pages),
        "--database-url", database_url, "--admin-url", admin_url,
    ]  # fmt: skip
    output = subprocess.run(  # noqa: S603 - our own interpreter and script
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=False
    )
    if output.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{output.stderr[-4000:]}")
    result: dict[str, float] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=["plain", "scan"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--database-url")
    parser.add_argument("--admin-url")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from shared.local.database import apply_schema, create_database, start_server

    data_dir = Path(tempfile.gettempdir()) / "hiredhands-bench-scan-pg"
    server = start_server(data_dir)
    name = f"bench_scan_{secrets.token_hex(4)}"
    create_database(server, name, replace=True)
    apply_schema(server.url(name), seed=False)

    receive, send = multiprocessing.Pipe(duplex=False)
    site = multiprocessing.Process(target=_serve_site, args=(args.pages, send, 3600.0), daemon=True)
    site.start()
    try:
        port = receive.recv()
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "scan": []}
        ratios = []
        for round_ in range(args.rounds):
            order = ("plain", "scan") if round_ % 2 == 0 else ("scan", "plain")
            results = {
                kind: _run(kind, port, args.pages, server.url(name, user="authenticator"), server.url(name))
                for kind in order
            }
            for kind, result in results.items():
                runs[kind].append(result)
            ratios.append(results["scan"]["seconds"] / results["plain"]["seconds"])
            scan_s, plain_s = results["scan"]["seconds"], results["plain"]["seconds"]
            print(f"round {round_ + 1}: scan {scan_s:.2f} s, plain {plain_s:.2f} s, ratio {ratios[-1]:.3f}")
    finally:
        site.terminate()
        site.join()
        import psycopg

        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')

    print(f"site: {args.pages} linked HTML pages on loopback (own process); {args.rounds} rounds, fresh process each")
    for kind, label in (("plain", "plain httpx loop + extractor"), ("scan", "scan (run_scans, offline)")):
        seconds = statistics.median(r["seconds"] for r in runs[kind])
        pages = statistics.median(r["pages"] for r in runs[kind])
        rss = statistics.median(r["peak_rss_mb"] for r in runs[kind])
        print(f"  {label:30s} {pages / seconds:7.1f} pages/s  ({pages:.0f} pages stored)  peak RSS {rss:6.1f} MiB")
    print(f"  median time ratio scan/plain: {statistics.median(ratios):.3f}x (target < 1.3x)")


if __name__ == "__main__":
    main()
