"""Throughput and latency of POST /api/stripe/webhook, and proof that it applied each event once.

Sends 1,000 distinct signed events plus 1,000 duplicate deliveries of them (shuffled, so some
duplicates race their original) from 20 concurrent senders to the webhook function in process
(ASGI, the same app Vercel runs), against the local stack: the embedded Postgres with every
migration, through the real pool as the ``authenticator`` login role. Stripe's API is a loopback
server in its own process (the subscription re-read of every distinct event goes through
stripe-python's HTTPX client to it). Prints events/s, median and p99 latency for first deliveries
and duplicates, and the ledger count that proves exactly-once.

From the repo root: `PYTHONPATH=. .venv/bin/python bench/bench_stripe_webhook.py [--events 1000]
[--duplicates 1000] [--senders 20] [--orgs 100] [--pool 10]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import psycopg
import stripe

WEBHOOK_SECRET = "whsec_bench_0123456789abcdefghijklmnop"  # noqa: S105 - a local, made-up value
SECRET_KEY = "sk_test_bench_0123456789abcdefghijklmnop"  # noqa: S105 - a local, made-up value
PERIOD_END = int(time.time()) + 30 * 86400


# -- a loopback Stripe: GET /v1/subscriptions/sub_<org>_<n> answers an active pro subscription -----


def _subscription(sub_id: str) -> bytes:
    org_index = sub_id.split("_")[1]
    return json.dumps(
        {
            "id": sub_id,
            "object": "subscription",
            "customer": f"cus_bench{org_index}",
            "status": "active",
            "metadata": {},
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": f"si_{sub_id}",
                        "object": "subscription_item",
                        "current_period_end": PERIOD_END,
                        "price": {"id": "price_pro", "object": "price", "lookup_key": "hiredhands_pro_monthly"},
                    }
                ],
            },
        }
    ).encode()


async def _serve(ready: Connection, stop_after: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                body = _subscription(path.split("?")[0].rsplit("/", 1)[1])
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nRequest-Id: req_bench\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.send(server.sockets[0].getsockname()[1])
    async with server:
        await asyncio.sleep(stop_after)  # stops by itself even if the parent dies


def _stripe_process(ready: Connection, stop_after: float) -> None:
    asyncio.run(_serve(ready, stop_after))


# -- the local stack -------------------------------------------------------------------------------


def _database() -> tuple[str, str]:
    from shared.local.database import apply_schema, create_database, start_server

    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-pg")
    create_database(server, "hh_bench_webhook", replace=True)
    apply_schema(server.url("hh_bench_webhook"), seed=False)
    return server.url("hh_bench_webhook"), server.url("hh_bench_webhook", user="authenticator")


def _orgs(admin_url: str, count: int) -> list[uuid.UUID]:
    ids = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for index in range(count):
            row = conn.execute("insert into public.organizations (name) values (%s) returning id", (f"Bench {index}",))
            org_id = row.fetchone()[0]  # type: ignore[index]
            conn.execute(
                "insert into public.billing_accounts (org_id, stripe_customer_id) values (%s, %s)",
                (org_id, f"cus_bench{index}"),
            )
            ids.append(org_id)
    return ids


def _events(count: int, orgs: int) -> list[tuple[str, bytes]]:
    """Distinct events spread over the organizations: subscription updates and paid invoices."""
    events = []
    now = int(time.time())
    for n in range(count):
        org_index = n % orgs
        sub_id = f"sub_{org_index}_0"
        if n % 4 == 3:
            obj = {
                "id": f"in_bench{n}",
                "object": "invoice",
                "customer": f"cus_bench{org_index}",
                "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub_id}},
            }
            kind = "invoice.paid"
        else:
            obj = {"id": sub_id, "object": "subscription", "customer": f"cus_bench{org_index}", "status": "active"}
            kind = "customer.subscription.updated"
        event_id = f"evt_bench{n:06d}{uuid.uuid4().hex[:8]}"
        body = json.dumps(
            {
                "id": event_id,
                "object": "event",
                "type": kind,
                "created": now - count + n,
                "livemode": False,
                "data": {"object": obj},
            }
        ).encode()
        events.append((event_id, body))
    return events


def _latency(label: str, values: list[float]) -> str:
    median, p99 = statistics.median(values) * 1e3, _pct(values, 0.99) * 1e3
    return f"  {label:<15} median {median:7.2f} ms   p99 {p99:7.2f} ms   n={len(values)}"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(deliveries: list[tuple[str, bytes]], senders: int) -> tuple[float, list[tuple[int, str, float]]]:
    from functions.webhook.stripe_webhook import app
    from shared.billing.stripe_client import close_stripe_clients
    from shared.db.pool import close_pools

    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for delivery in deliveries:
        queue.put_nowait(delivery)
    results: list[tuple[int, str, float]] = []
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def sender(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            _, body = queue.get_nowait()
            text = body.decode()
            headers = {
                "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(text, WEBHOOK_SECRET),
                "Content-Type": "application/json",
            }
            started = time.perf_counter()
            response = await client.post("/api/stripe/webhook", content=body, headers=headers)
            elapsed = time.perf_counter() - started
            outcome = response.json().get("outcome", "?") if response.status_code == 200 else "error"
            results.append((response.status_code, outcome, elapsed))

    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        warm = await client.post("/api/stripe/webhook", content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})
        assert warm.status_code == 400
        started = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(senders)))
        wall = time.perf_counter() - started
    await close_stripe_clients()
    await close_pools()
    return wall, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--duplicates", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--pool", type=int, default=10, help="DB_POOL_MAX_SIZE of the function")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    receive, send = multiprocessing.Pipe(duplex=False)
    fake = multiprocessing.Process(target=_stripe_process, args=(send, 600.0), daemon=True)
    fake.start()
    try:
        port = receive.recv()
        admin_url, app_url = _database()
        os.environ.update(
            {
                "ENVIRONMENT": "local",
                "DATABASE_URL": app_url,
                "DB_POOL_MAX_SIZE": str(args.pool),
                "DB_CONNECT_TIMEOUT_SECONDS": "30",
                "STRIPE_SECRET_KEY": SECRET_KEY,
                "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
                "STRIPE_API_BASE": f"http://127.0.0.1:{port}",
            }
        )
        import logging

        from shared.logs import get_logger

        get_logger().setLevel(logging.WARNING)  # one JSON line per request would dominate the timing

        org_ids = _orgs(admin_url, args.orgs)
        events = _events(args.events, args.orgs)
        rng = random.Random(args.seed)
        duplicates = [rng.choice(events) for _ in range(args.duplicates)]
        deliveries = events + duplicates
        rng.shuffle(deliveries)

        wall, results = asyncio.run(_run(deliveries, args.senders))

        with psycopg.connect(admin_url) as conn:
            ids = [e[0] for e in events]
            ledger, distinct = conn.execute(
                "select count(*), count(distinct id) from public.stripe_events where id = any(%s)", (ids,)
            ).fetchone()  # type: ignore[misc]
            plan_changes = conn.execute(
                "select count(*) from public.audit_log where action = 'billing.plan_changed' and org_id = any(%s)",
                (org_ids,),
            ).fetchone()[0]  # type: ignore[index]
            pro_orgs = conn.execute(
                "select count(*) from public.organization_limits where plan = 'pro' and org_id = any(%s)", (org_ids,)
            ).fetchone()[0]  # type: ignore[index]
    finally:
        fake.terminate()
        fake.join()

    statuses = {s for s, _, _ in results}
    first = [t for _, o, t in results if o != "duplicate"]
    dupes = [t for _, o, t in results if o == "duplicate"]
    outcomes: dict[str, int] = {}
    for _, outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    everything = [t for _, _, t in results]

    print(
        f"deliveries: {len(deliveries)} ({args.events} distinct + {args.duplicates} duplicates), "
        f"{args.senders} concurrent senders, {args.orgs} organizations, pool {args.pool}, in-process ASGI"
    )
    print(
        f"  wall {wall:.2f} s -> {len(deliveries) / wall:.0f} deliveries/s ({args.events / wall:.0f} distinct events/s)"
    )
    print(_latency("all deliveries", everything))
    print(_latency("first delivery", first) + "   (verify, Stripe re-read, one transaction)")
    if dupes:
        ratio = statistics.median(dupes) / statistics.median(first)
        print(_latency("duplicate", dupes) + f"   (median duplicate/first {ratio:.2f}x)")
    print(f"  HTTP statuses: {sorted(statuses)}   outcomes: {dict(sorted(outcomes.items()))}")
    print(
        f"  ledger rows for the {args.events} distinct ids: {ledger} ({distinct} distinct) -> "
        f"{'exactly once' if ledger == distinct == args.events else 'MISMATCH'}"
    )
    print(f"  plan changes audited: {plan_changes} for {args.orgs} organizations now on pro: {pro_orgs}")
    assert statuses == {200}, statuses
    assert ledger == distinct == args.events
    assert plan_changes == pro_orgs == args.orgs


if __name__ == "__main__":
    main()
