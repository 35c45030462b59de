"""Background work on Vercel Queues against today's cron path, on the SDK's own queue emulation.

Two measurements, each printed with the baseline beside it:

* ``deliveries``: latency from a review item's commit to the receiver's request. Items are committed
  one at a time at a steady pace to an organization with one custom-webhook connection (a receiver
  in its own process records when each ``webhook-id`` arrives). The queue path announces each
  delivery after the commit and the subscriber (``shared.connections.delivery.on_message``) sends
  it, pushed by the SDK's embedded queue service; the cron path is the worker as the cron runs it,
  once a minute (``--cron-interval``), with no grace. Prints p50, p90, p99 and max for both.
* ``scans``: 20 scans of 100 pages on 20 hosts (20 loopback sites served from their own process),
  advanced in queue steps by 1, then by W parallel subscriber processes, each consuming from the
  SDK's HTTP queue dev server with the SDK's polling consumer (on Vercel the platform pushes; the
  work per message is the same). Prints the wall time and the speed-up, the pages stored twice
  (from the database), each host's most requests in flight at once and smallest gap between two
  requests (from the sites), against the politeness delay. Also the CPU time per page stored: of the
  subscribers, of every process of the run (subscribers, sites, queue server, this process with the
  Redis bridge), and of the whole machine, with the speed-up the machine's cores allow at that cost
  (the W-subscriber round cannot finish sooner than its CPU time spread over every core).

Loopback only: the embedded PostgreSQL lives in a temporary directory, Redis is the local
redis-server behind the Upstash REST bridge (as in ``hiredhands dev``). From the repository root:

    PYTHONPATH=. .venv/bin/python bench/bench_queues.py deliveries [--items 200] [--rate 10]
    PYTHONPATH=. .venv/bin/python bench/bench_queues.py scans [--workers 1 4] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The local stack: database, Redis behind the REST bridge.
# ---------------------------------------------------------------------------------------------


def _stack(name: str) -> tuple[str, str, Any]:
    """(admin URL, app URL, the bridge) and the environment the code under test reads."""
    from shared.local.cli import _ensure_redis
    from shared.local.database import apply_schema, create_database, start_server
    from shared.local.redis_bridge import start_bridge

    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-queues-pg")
    create_database(server, name, replace=True)
    apply_schema(server.url(name), seed=False)
    redis_url, _ = _ensure_redis()
    bridge = start_bridge(redis_url, secrets.token_urlsafe(24))
    os.environ.update(
        {
            "ENVIRONMENT": "local",
            "DATABASE_URL": server.url(name, user="authenticator"),
            "CREDENTIAL_KEYS": "bench:" + base64.b64encode(os.urandom(32)).decode(),
            "UPSTASH_REDIS_REST_URL": bridge.url,
            "UPSTASH_REDIS_REST_TOKEN": bridge.token,
        }
    )
    return server.url(name), server.url(name, user="authenticator"), bridge


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return f"p50 {at(0.5):6.3f} s  p90 {at(0.9):6.3f} s  p99 {at(0.99):6.3f} s  max {ordered[-1]:6.3f} s"


# ---------------------------------------------------------------------------------------------
# Deliveries: latency from commit to the receiver's request.
# ---------------------------------------------------------------------------------------------


async def _receive(ready: Connection, control: Connection) -> None:
    arrivals: dict[str, float] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.time()
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                arrivals.setdefault(headers.get("webhook-id", ""), arrived)
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
    control.send(arrivals)


def _receiver_process(ready: Connection, control: Connection) -> None:
    asyncio.run(_receive(ready, control))


def _provider_env(port: int) -> Any:
    from shared.connections.providers import ProviderEnvironment
    from shared.egress import DEFAULT_PORTS, EgressPolicy

    return ProviderEnvironment(
        https_only=False,
        policy=EgressPolicy(
            purpose="connection", allowed_ports=DEFAULT_PORTS | {port}, allow_addresses=frozenset({f"127.0.0.1:{port}"})
        ),
    )


async def _org_with_webhook(admin_url: str, port: int) -> uuid.UUID:
    from psycopg import AsyncConnection

    from shared.connections.schemas import Credential
    from shared.connections.service import seal_credential

    org_id, connection_id = uuid.uuid4(), uuid.uuid4()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    sealed = seal_credential(
        Credential(url=f"http://127.0.0.1:{port}/hooks/bench", secret=secret),
        org_id=org_id,
        connection_id=connection_id,
    )
    async with await AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute("insert into public.organizations (id, name) values (%s, 'bench')", (org_id,))
        await conn.execute(
            "insert into public.connections (id, org_id, kind, name, target, deliver_kinds)"
            " values (%s, %s, 'webhook', 'bench receiver', '{}', '{escalation}')",
            (connection_id, org_id),
        )
        await conn.execute(
            "insert into secrets.connection_credentials (connection_id, org_id, key_id, nonce, ciphertext)"
            " values (%s, %s, %s, %s, %s)",
            (connection_id, org_id, sealed.key_id, sealed.nonce, sealed.ciphertext),
        )
    return org_id


async def _latencies(admin_url: str, path: str, items: int, rate: float, cron_interval: float) -> list[float]:
    """Commit ``items`` review items at ``rate`` per second; seconds from each commit to its request."""
    from psycopg import AsyncConnection
    from vercel.queue import Message, subscribe
    from vercel.queue.embedded import embedded_queue_service

    from shared.connections import delivery, outbox
    from shared.connections.delivery import WorkerSettings, run_deliveries
    from shared.db.pool import close_pools
    from shared.db.session import get_database
    from shared.queues import DELIVERIES_CONSUMER, DELIVERIES_TOPIC, QueueEnvironment, come_back

    ctx = multiprocessing.get_context("spawn")
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    control_here, control_there = ctx.Pipe()
    receiver = ctx.Process(target=_receiver_process, args=(ready_send, control_there), daemon=True)
    receiver.start()
    port = ready_recv.recv()
    env = _provider_env(port)
    org_id = await _org_with_webhook(admin_url, port)
    db = get_database()
    committed: dict[str, float] = {}

    async def commit_items(announce: QueueEnvironment | None) -> None:
        async with await AsyncConnection.connect(admin_url, autocommit=True) as conn:
            started = time.monotonic()
            for n in range(items):
                await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
                cursor = await conn.execute(
                    "insert into public.review_items (org_id, kind, title, payload)"
                    " values (%s, 'escalation', %s, '{}') returning id",
                    (org_id, f"Bench item {n}"),
                )
                row = await cursor.fetchone()
                assert row is not None
                committed_at = time.time()  # the insert has committed (autocommit)
                key = await (
                    await conn.execute("select idempotency_key from public.deliveries where review_item_id = %s", row)
                ).fetchone()
                assert key is not None
                committed["msg_" + key[0].hex] = committed_at
                if announce is not None:
                    await outbox.announce(db, announce, [row[0]])

    if path == "queue":

        @subscribe(topic=DELIVERIES_TOPIC, consumer_group=DELIVERIES_CONSUMER)
        async def send_delivery(message: Message[dict[str, object]]) -> None:
            come_back(await delivery.on_message(db, message.payload, env=env))

        async with embedded_queue_service() as service:
            await commit_items(QueueEnvironment(client=service.get_async_client))
            await asyncio.sleep(2.0)  # the last ones arrive
        del send_delivery
        await delivery.close_clients()
    else:
        settings = WorkerSettings(stale_after_seconds=0.0, time_budget_seconds=8.0)

        async def cron() -> None:
            while True:  # Vercel Cron: at the start of every minute
                await asyncio.sleep(cron_interval - time.time() % cron_interval)
                await run_deliveries(db, env=env, settings=settings)

        ticking = asyncio.create_task(cron())
        await commit_items(None)
        while not await _all_delivered(admin_url, org_id):  # noqa: ASYNC110 - polling the database
            await asyncio.sleep(0.5)
        ticking.cancel()
    await close_pools()
    control_here.send("stop")
    arrivals: dict[str, float] = control_here.recv()
    receiver.join(timeout=5)
    missing = set(committed) - set(arrivals)
    if missing:
        raise SystemExit(f"{path}: {len(missing)} deliveries never arrived")
    return [arrivals[key] - committed[key] for key in committed]


async def _all_delivered(admin_url: str, org_id: uuid.UUID) -> bool:
    from psycopg import AsyncConnection

    async with await AsyncConnection.connect(admin_url) as conn:
        row = await (
            await conn.execute(
                "select count(*) filter (where status <> 'delivered') from public.deliveries where org_id = %s",
                (org_id,),
            )
        ).fetchone()
    return row is not None and row[0] == 0


def deliveries(args: argparse.Namespace) -> None:
    import logging

    logging.getLogger("hiredhands").setLevel(logging.WARNING)
    admin_url, _, bridge = _stack(f"bench_queues_{secrets.token_hex(4)}")
    try:
        results = {}
        for path in ("queue", "cron"):
            count = args.items if path == "queue" else args.cron_items
            print(f"{path}: committing {count} items at {args.rate:g}/s ...", flush=True)
            results[path] = asyncio.run(_latencies(admin_url, path, count, args.rate, args.cron_interval))
    finally:
        bridge.stop()
    print(f"commit -> receiver's request, one webhook connection, items at {args.rate:g}/s:")
    queue, cron = results["queue"], results["cron"]
    print(f"  queue (embedded queue service, push): {_percentiles(queue)}  (n={len(queue)})")
    print(f"  cron (every {args.cron_interval:g} s, today's path): {_percentiles(cron)}  (n={len(cron)})")
    q99 = sorted(queue)[round(0.99 * (len(queue) - 1))]
    ratio = statistics.median(cron) / statistics.median(queue)
    print(f"  queue p99 {q99:.3f} s (target <= 2 s); cron median / queue median: {ratio:.0f}x")


# ---------------------------------------------------------------------------------------------
# Scans: 20 hosts, 1 vs W subscriber processes.
# ---------------------------------------------------------------------------------------------


def _serve_sites(hosts: int, pages: int, ready: Connection, control: Connection) -> None:
    from tests.fakes.site import generated_site, running_site

    with contextlib.ExitStack() as stack:
        sites = [stack.enter_context(running_site(generated_site(pages, seed=n))) for n in range(hosts)]
        ready.send([site.port for site in sites])
        while True:
            command = control.recv()
            if command == "reset":
                for site in sites:
                    site.reset()
                control.send("ok")
                continue
            report = []
            for site in sites:
                arrivals = sorted(t for t, _ in site.times)
                gaps = [b - a for a, b in itertools.pairwise(arrivals)]
                repeated = sum(1 for path, n in site.page_hits().items() if n > 1)
                report.append(
                    {
                        "requests": len(arrivals),
                        "max_in_flight": site.max_in_flight,
                        "min_gap": min(gaps, default=0.0),
                        "pages_requested_twice": repeated,
                    }
                )
            control.send(report)
            if command == "stop":
                return


def _scan_env(ports: list[int], politeness: float) -> Any:
    from dataclasses import replace

    from shared.egress import SCAN_POLICY
    from shared.scans import ScanEnvironment
    from tests.fakes.site import SiteResolver

    return ScanEnvironment(
        policy=replace(
            SCAN_POLICY,
            allow_addresses=frozenset(f"127.0.0.1:{port}" for port in ports),
            allowed_ports=SCAN_POLICY.allowed_ports | set(ports),
        ),
        resolver=SiteResolver({f"site{n}.example": ["127.0.0.1"] for n in range(len(ports))}),
        politeness_seconds=politeness,
        step_seconds=2.0,
        lease_seconds=60,
        concurrency=1,
    )


_SUBSCRIBER = """
import asyncio, json, logging, sys, uuid
from vercel.queue import Message, poll_and_handle, subscribe
from shared.db.session import get_database
from shared.queues import PRODUCTION, SCAN_STEPS_CONSUMER, SCAN_STEPS_TOPIC, come_back
from shared.scans.worker import run_step
sys.path.insert(0, "bench")
from bench_queues import _scan_env
logging.disable(logging.INFO)
env = _scan_env(json.loads(sys.argv[1]), float(sys.argv[2]))

@subscribe(topic=SCAN_STEPS_TOPIC, consumer_group=SCAN_STEPS_CONSUMER)
async def take_scan_step(message: Message[dict[str, object]]) -> None:
    payload = message.payload
    _, back = await run_step(get_database(), uuid.UUID(str(payload["scan_id"])), int(payload["step"]), env=env)
    come_back(back)

print("ready", flush=True)
asyncio.run(poll_and_handle(take_scan_step, interval=0.05, limit=1))
"""


async def _make_agents(admin_url: str, hosts: int, pages: int) -> list[dict[str, Any]]:
    from psycopg import AsyncConnection
    from psycopg.rows import dict_row

    from tests.factories import create_agent, create_org

    agents = []
    async with await AsyncConnection.connect(admin_url, row_factory=dict_row, autocommit=True) as conn:
        for _ in range(hosts):
            org = await create_org(conn)
            agent = await create_agent(conn, org)
            agent["owner"] = org["owner"]
            await conn.execute(
                "update public.organization_limits set max_scan_pages = %s where org_id = %s", (pages, org["id"])
            )
            agents.append(agent)
    return agents


async def _queue_scans(agents: list[dict[str, Any]], ports: list[int], politeness: float) -> list[uuid.UUID]:
    """``create_scan`` for each host, as the API does: the row commits, then its first step's message."""
    from shared.db.pool import close_pools
    from shared.db.session import get_database
    from shared.queues import PRODUCTION
    from shared.scans import ScanCreate, create_scan
    from tests.factories import user_claims

    env = _scan_env(ports, politeness)
    scans = []
    for n, (agent, port) in enumerate(zip(agents, ports, strict=True)):
        body = ScanCreate(agent_id=agent["id"], start_url=f"http://site{n}.example:{port}/", max_depth=20)
        scan = await create_scan(
            get_database(), user_claims(agent["owner"]), body, env=env, queue=PRODUCTION, request_id=None
        )
        scans.append(scan.id)
    await close_pools()
    return scans


async def _scan_outcome(admin_url: str, scans: list[uuid.UUID]) -> dict[str, Any]:
    from psycopg import AsyncConnection

    async with await AsyncConnection.connect(admin_url) as conn:
        statuses = await (
            await conn.execute("select status, pages_fetched, step from public.scans where id = any(%s)", (scans,))
        ).fetchall()
        twice = await (
            await conn.execute(
                "select count(*) from (select scan_id, url, content from public.knowledge_chunks"
                " where scan_id = any(%s) group by 1, 2, 3 having count(*) > 1) d",
                (scans,),
            )
        ).fetchone()
    return {
        "finished": sum(1 for status, _, _ in statuses if status not in ("queued", "running")),
        "completed": sum(1 for status, _, _ in statuses if status == "completed"),
        "pages_stored": sum(pages for _, pages, _ in statuses),
        "steps": sum(step for _, _, step in statuses),
        "chunks_stored_twice": twice[0] if twice else -1,
    }


def _cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of processes ``pids`` so far (Linux ``/proc``); a process gone counts 0."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent on anything but idling or waiting for I/O, since boot (``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _scan_round(
    admin_url: str, ports: list[int], args: argparse.Namespace, workers: int, control: Connection, sites_pid: int
) -> dict[str, Any]:
    control.send("reset")
    control.recv()
    devserver = subprocess.Popen(
        [sys.executable, "-m", "vercel.queue.devserver", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert devserver.stdout is not None
    queue_env = {
        "VERCEL_QUEUE_BASE_URL": json.loads(devserver.stdout.readline())["baseUrl"],
        "VERCEL_QUEUE_TOKEN": "vc-dev-token",
        "VERCEL_REGION": "iad1",
    }
    os.environ.update(queue_env)
    subscribers: list[subprocess.Popen[str]] = []
    try:
        subscribers = [
            subprocess.Popen(  # noqa: S603 - our own interpreter and script
                [sys.executable, "-c", _SUBSCRIBER, json.dumps(ports), str(args.politeness)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(workers)
        ]
        for process in subscribers:  # imports done: the clock measures the work, not the start-up
            assert process.stdout is not None
            process.stdout.readline()
        agents = asyncio.run(_make_agents(admin_url, len(ports), args.pages))
        ours = [os.getpid(), sites_pid, devserver.pid]
        workers_cpu = [process.pid for process in subscribers]
        cpu_before = (_cpu_seconds(workers_cpu), _cpu_seconds(ours), _machine_busy_seconds())
        # Each scan sends its first step's message; the subscribers take them as they come.
        started = time.monotonic()
        scans = asyncio.run(_queue_scans(agents, ports, args.politeness))
        queued = time.monotonic() - started
        while True:
            outcome = asyncio.run(_scan_outcome(admin_url, scans))
            if outcome["finished"] == len(scans):
                break
            if time.monotonic() - started > 1800:
                raise SystemExit(f"scans unfinished after 30 min: {outcome}")
            time.sleep(0.25)
        seconds = time.monotonic() - started
        subscribers_cpu = _cpu_seconds(workers_cpu) - cpu_before[0]
        cpu = {
            "subscribers": subscribers_cpu,
            "run": subscribers_cpu + _cpu_seconds(ours) - cpu_before[1],
            "machine": _machine_busy_seconds() - cpu_before[2],
        }
    finally:
        for process in subscribers:
            process.terminate()
            process.wait(timeout=10)
        devserver.terminate()
        devserver.wait(timeout=10)
    control.send("report")
    hosts = control.recv()
    return {"seconds": seconds, "queued_in": queued, "outcome": outcome, "hosts": hosts, "cpu": cpu}


def scans(args: argparse.Namespace) -> None:
    admin_url, _, bridge = _stack(f"bench_queues_{secrets.token_hex(4)}")
    ctx = multiprocessing.get_context("spawn")
    ready_recv, ready_send = ctx.Pipe(duplex=False)
    control_here, control_there = ctx.Pipe()
    sites = ctx.Process(target=_serve_sites, args=(args.hosts, args.pages, ready_send, control_there), daemon=True)
    sites.start()
    ports = ready_recv.recv()
    times: dict[int, list[float]] = {workers: [] for workers in args.workers}
    run_cpu: dict[int, list[float]] = {workers: [] for workers in args.workers}
    cores = os.cpu_count() or 1
    try:
        for round_ in range(args.rounds):
            order = args.workers if round_ % 2 == 0 else list(reversed(args.workers))
            for workers in order:
                result = _scan_round(admin_url, ports, args, workers, control_here, sites.pid or 0)
                times[workers].append(result["seconds"])
                run_cpu[workers].append(result["cpu"]["run"])
                hosts = result["hosts"]
                print(
                    f"round {round_ + 1}, {workers} subscriber(s): {result['seconds']:.1f} s "
                    f"(all queued after {result['queued_in']:.1f} s); {json.dumps(result['outcome'])}"
                )
                twice = sum(h["pages_requested_twice"] for h in hosts)
                print(
                    f"   hosts: requests {sum(h['requests'] for h in hosts)}, "
                    f"most in flight at once to one host {max(h['max_in_flight'] for h in hosts)}, "
                    f"smallest gap between two requests to one host {min(h['min_gap'] for h in hosts):.3f} s "
                    f"(politeness {args.politeness} s), pages requested twice {twice}",
                    flush=True,
                )
                cpu, pages = result["cpu"], max(1, result["outcome"]["pages_stored"])
                print(
                    f"   CPU per page stored: subscribers {1000 * cpu['subscribers'] / pages:.1f} ms, "
                    f"the run's processes {1000 * cpu['run'] / pages:.1f} ms, "
                    f"the machine {1000 * cpu['machine'] / pages:.1f} ms; "
                    f"the machine was {100 * cpu['machine'] / (cores * result['seconds']):.0f}% busy ({cores} cores)",
                    flush=True,
                )
    finally:
        control_here.send("stop")
        control_here.recv()
        sites.join(timeout=10)
        bridge.stop()
    low, high = min(args.workers), max(args.workers)
    median = {workers: statistics.median(values) for workers, values in times.items()}
    print(
        f"{args.hosts} scans x {args.pages} pages on {args.hosts} hosts: {low} subscriber(s) {median[low]:.1f} s, "
        f"{high} subscribers {median[high]:.1f} s: speed-up {median[low] / median[high]:.2f}x "
        f"(target >= 3x, {cores} CPU cores)"
    )
    # At the W-subscriber round's CPU cost, the round needs at least that CPU time spread over every core.
    floor = statistics.median(run_cpu[high]) / cores
    print(
        f"  the run's processes used {statistics.median(run_cpu[high]):.1f} CPU s with {high} subscribers: "
        f"on {cores} cores no faster than {floor:.1f} s, a speed-up of at most {median[low] / floor:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("deliveries")
    d.add_argument("--items", type=int, default=200)
    d.add_argument("--cron-items", type=int, default=300)
    d.add_argument("--rate", type=float, default=5.0, help="items committed per second")
    d.add_argument("--cron-interval", type=float, default=60.0)
    d.set_defaults(func=deliveries)
    s = sub.add_parser("scans")
    s.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    s.add_argument("--rounds", type=int, default=1)
    s.add_argument("--hosts", type=int, default=20)
    s.add_argument("--pages", type=int, default=100)
    s.add_argument("--politeness", type=float, default=0.05, help="seconds between two requests to one host")
    s.set_defaults(func=scans)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
