"""Outbox throughput: 1,000 pending deliveries to a local receiver, drained by 1 worker vs 4 workers.

Each scenario gets a fresh organization with one custom-webhook connection and N review items (the
database enqueues one delivery per item), then starts W worker processes, each running exactly what
the cron runs (`run_deliveries`: claim with FOR UPDATE SKIP LOCKED, send through the egress guard,
record), against a receiver in its own process that answers 200 and counts every ``webhook-id``.
It prints deliveries per second and proves that none was sent twice: the receiver saw N requests
with N distinct ids, and every delivery row is ``delivered`` after exactly one attempt.

    PYTHONPATH=. .venv/bin/python bench/bench_outbox.py [--deliveries 1000] [--workers 1 4]

Loopback only; the embedded PostgreSQL lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

import psycopg

from shared.local.database import apply_schema, create_database, start_server

DATABASE = "bench_outbox"


# ---------------------------------------------------------------------------------------------
# The receiver: a minimal HTTP/1.1 server with keep-alive that records webhook-id headers.
# ---------------------------------------------------------------------------------------------


async def _receive(ready: Connection, control: Connection) -> None:
    seen: Counter[str] = Counter()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                seen[headers.get("webhook-id", "")] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.send(server.sockets[0].getsockname()[1])
    async with server:
        await asyncio.get_running_loop().run_in_executor(None, control.recv)  # "stop"
    control.send(
        {"requests": sum(seen.values()), "distinct_ids": len(seen), "max_per_id": max(seen.values(), default=0)}
    )


def _receiver_process(ready: Connection, control: Connection) -> None:
    asyncio.run(_receive(ready, control))


# ---------------------------------------------------------------------------------------------
# A worker process: what the cron invocation runs.
# ---------------------------------------------------------------------------------------------


def _worker_process(port: int, start_at: float, results: Connection) -> None:
    from shared.connections.delivery import WorkerSettings, run_deliveries
    from shared.connections.providers import ProviderEnvironment
    from shared.db.pool import close_pools
    from shared.db.session import get_database
    from shared.egress import DEFAULT_PORTS, EgressPolicy

    env = ProviderEnvironment(
        https_only=False,
        policy=EgressPolicy(
            purpose="connection", allowed_ports=DEFAULT_PORTS | {port}, allow_addresses=frozenset({f"127.0.0.1:{port}"})
        ),
    )

    async def go() -> dict[str, int]:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # all workers start together
        try:
            report = await run_deliveries(
                get_database(), env=env, settings=WorkerSettings(batch_size=20, concurrency=10, time_budget_seconds=300)
            )
        finally:
            await close_pools()
        return report.as_dict()

    results.send(asyncio.run(go()))


# ---------------------------------------------------------------------------------------------
# Scenario setup and checks.
# ---------------------------------------------------------------------------------------------


def _prepare(admin_url: str, port: int, deliveries: int) -> uuid.UUID:
    from shared.connections.schemas import Credential
    from shared.connections.service import seal_credential

    org_id, connection_id = uuid.uuid4(), uuid.uuid4()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    sealed = seal_credential(
        Credential(url=f"http://127.0.0.1:{port}/hooks/bench", secret=secret),
        org_id=org_id,
        connection_id=connection_id,
    )
    with psycopg.connect(admin_url, autocommit=True) as conn, conn.transaction():
        conn.execute("insert into public.organizations (id, name) values (%s, 'bench')", (org_id,))
        conn.execute(
            "insert into public.connections (id, org_id, kind, name, target, deliver_kinds)"
            " values (%s, %s, 'webhook', 'bench receiver', '{}', '{escalation}')",
            (connection_id, org_id),
        )
        conn.execute(
            "insert into secrets.connection_credentials (connection_id, org_id, key_id, nonce, ciphertext)"
            " values (%s, %s, %s, %s, %s)",
            (connection_id, org_id, sealed.key_id, sealed.nonce, sealed.ciphertext),
        )
        conn.execute(
            "insert into public.review_items (org_id, kind, title, payload)"
            " select %s, 'escalation', 'Bench item ' || g, jsonb_build_object('n', g) from generate_series(1, %s) g",
            (org_id, deliveries),
        )
        conn.execute("analyze public.deliveries")
    return org_id


def _outcome(admin_url: str, org_id: uuid.UUID) -> dict[str, int]:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "select count(*) filter (where status = 'delivered') as delivered,"
            "       count(*) filter (where status <> 'delivered') as not_delivered,"
            "       max(attempts) as max_attempts"
            "  from public.deliveries where org_id = %s",
            (org_id,),
        ).fetchone()
    assert row is not None
    return {"delivered": row[0], "not_delivered": row[1], "max_attempts": row[2]}


def scenario(admin_url: str, deliveries: int, workers: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    control_here, control_there = ctx.Pipe()
    receiver = ctx.Process(target=_receiver_process, args=(ready_send, control_there), daemon=True)
    receiver.start()
    port = ready_recv.recv()
    org_id = _prepare(admin_url, port, deliveries)

    start_at = time.time() + 2.0  # after every worker process has imported the code
    pipes, processes = [], []
    for _ in range(workers):
        here, there = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_worker_process, args=(port, start_at, there))
        process.start()
        pipes.append(here)
        processes.append(process)
    reports = [pipe.recv() for pipe in pipes]
    elapsed = time.time() - start_at
    for process in processes:
        process.join()
    control_here.send("stop")
    received = control_here.recv()
    receiver.join(timeout=5)

    outcome = _outcome(admin_url, org_id)
    claimed = sum(r["claimed"] for r in reports)
    rate = deliveries / elapsed
    print(
        f"{workers} worker(s): {deliveries} deliveries in {elapsed:.2f} s = {rate:,.0f} deliveries/s; "
        f"per worker delivered {[r['delivered'] for r in reports]}"
    )
    print(
        f"   receiver: {received['requests']} requests, {received['distinct_ids']} distinct webhook-ids, "
        f"max {received['max_per_id']} per id; rows: {json.dumps(outcome)}; claims: {claimed}"
    )
    duplicates_free = (
        received["requests"] == deliveries
        and received["distinct_ids"] == deliveries
        and received["max_per_id"] == 1
        and outcome == {"delivered": deliveries, "not_delivered": 0, "max_attempts": 1}
        and claimed == deliveries
    )
    print(f"   none sent twice, none lost: {'yes' if duplicates_free else 'NO'}")
    if not duplicates_free:
        raise SystemExit(1)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()

    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-pg")
    create_database(server, DATABASE, replace=True)
    apply_schema(server.url(DATABASE), seed=False)
    os.environ["ENVIRONMENT"] = "local"
    os.environ["DATABASE_URL"] = server.url(DATABASE, user="authenticator")
    os.environ["CREDENTIAL_KEYS"] = "bench:" + base64.b64encode(os.urandom(32)).decode()
    os.environ["DB_POOL_MAX_SIZE"] = "5"

    rates = {workers: scenario(server.url(DATABASE), args.deliveries, workers) for workers in args.workers}
    if len(rates) > 1:
        low, high = min(rates), max(rates)
        print(f"speed-up {high} vs {low} worker(s): {rates[high] / rates[low]:.2f}x (on {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
