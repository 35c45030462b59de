"""Widget overhead: POST /api/widget/{key}/chat against a baseline endpoint, with the model answering instantly.

Everything runs on this machine, each server in its own process so no two share an interpreter:

* Postgres: the embedded server (``shared.local.database``), a fresh database with the migrations;
* Redis: the local ``redis-server`` behind the Upstash REST bridge (``shared.local.redis_bridge``);
* the model: the loopback OpenAI-compatible server of the tests (``tests/fakes/openai_server.py``),
  which answers every chat and embedding request at once;
* the widget function (``functions/external/widget_chat.py``) under uvicorn, configured through its
  environment as in production (OpenAI key and base URL pointing at the fake);
* the baseline: a FastAPI app from the same ``create_app`` (same middleware and log line) whose one
  endpoint makes one Postgres query (one round trip, from the same pool) and one Redis command
  (``INCR``, through the same Upstash client).

The load generator keeps ``concurrency`` clients busy; each client continues its conversation with
its visitor token for up to 40 turns, then opens a new one. Limits are raised so none refuses.
Baseline and chat run in alternating blocks (``--blocks``), so a change in the machine's load hits
both alike. Reported per endpoint and concurrency: median and p99 latency, requests per second, the
CPU time the endpoint's server process spent per request (from ``/proc``), and the ratios chat /
baseline (target: median under 2x). Two agents are measured: one with knowledge (the full
production path: embedding, hybrid retrieval, chat; 7 database round trips, 2 Redis requests, 2
model requests) and one without (no embedding or retrieval; 4 round trips, 2 Redis requests, 1
model request). Last, the 404 answers for unknown, disabled and rotated-out keys are timed,
interleaved, to show there is no timing oracle worth the name.

From the repo root (needs redis-server on 127.0.0.1:6379):

    PYTHONPATH=. .venv/bin/python bench/bench_widget.py [--requests 400] [--concurrency 1 50]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import psycopg

from shared.local.database import apply_schema, create_database, start_server

ORIGIN = "https://shop.example"
TURNS_PER_CONVERSATION = 40
BIG = 1_000_000_000
REDIS_URL = "redis://127.0.0.1:6379/0"
QUESTIONS = [
    "What are your opening hours?",
    "Do you repair e-bikes?",
    "How do returns work?",
    "Can I pick up my order in store?",
]
KNOWLEDGE = [
    ("Opening hours", "We are open Monday to Saturday from 9am to 6pm, and closed on Sundays."),
    ("Repairs", "Our workshop repairs bikes and e-bikes of every brand; book a slot online."),
    ("Returns", "Returns are accepted within 30 days with the receipt; refunds take five days."),
    ("Pick-up", "Orders can be collected in store two hours after you get the confirmation email."),
]


# -- child processes -----------------------------------------------------------------------------


def _quiet() -> None:
    # Keep the children's request log lines (still formatted and written) off the terminal.
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    return listener


def _run_bridge(ready: Connection, token: str) -> None:
    _quiet()
    from shared.local.redis_bridge import start_bridge

    bridge = start_bridge(REDIS_URL, token)
    ready.send(bridge.url)
    bridge.thread.join()


def _run_fake_openai(ready: Connection) -> None:
    _quiet()
    from tests.fakes.openai_server import start_fake_openai

    fake = start_fake_openai()
    ready.send((fake.base_url, fake.api_key))
    assert fake._thread is not None
    fake._thread.join()


def _baseline_app(key_hash: bytes) -> Any:
    from fastapi import APIRouter

    from shared.db.pool import get_pool
    from shared.redis import get_redis
    from shared.web.app import create_app

    router = APIRouter()

    @router.post("/baseline")
    async def baseline() -> dict[str, int]:
        pool = await get_pool()
        async with pool.connection() as conn:
            # One round trip: the login role may not read tables without choosing a role first, so
            # the query is one it can run (extended protocol and a parameter, as every query of ours).
            cur = await conn.execute("select octet_length(%s::bytea) as n", (key_hash,))
            await cur.fetchone()
        count = await get_redis().incr("bench:baseline")
        return {"count": count}

    return create_app("bench_baseline", [router])


def _run_server(ready: Connection, which: str, env: dict[str, str], key_hash: bytes) -> None:
    os.environ.update(env)
    _quiet()
    import uvicorn

    if which == "widget":
        from functions.external.widget_chat import app
    else:
        app = _baseline_app(key_hash)
    listener = _listener()
    ready.send(listener.getsockname()[1])
    config = uvicorn.Config(app, lifespan="off", ws="none", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])


def _start(target: Any, *args: Any) -> tuple[BaseProcess, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    if not parent.poll(60):
        process.terminate()
        raise RuntimeError(f"{target.__name__} did not start")
    return process, parent.recv()


# -- the database ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    app_url: str
    with_knowledge: str
    without_knowledge: str
    disabled: str
    rotated_out: str


def _agent(conn: psycopg.Connection[Any], org_id: uuid.UUID, key: str, *, enabled: bool = True) -> uuid.UUID:
    row = conn.execute(
        "insert into public.agents (org_id, name, display_name, greeting, system_prompt, widget_enabled,"
        " widget_key_hash, widget_key_hint, allowed_origins)"
        " values (%s, %s, 'Helper', 'Hi!', 'You answer for Acme Bikes.', %s, %s, %s, %s) returning id",
        (org_id, f"agent-{secrets.token_hex(3)}", enabled, hashlib.sha256(key.encode()).digest(), key[-4:], [ORIGIN]),
    ).fetchone()
    assert row is not None
    agent_id: uuid.UUID = row[0]
    return agent_id


def build_database() -> Fixture:
    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-widget-pg")
    name = "hh_bench_widget"
    create_database(server, name, replace=True)
    admin_url = server.url(name)
    apply_schema(admin_url, seed=False)
    keys = {label: "hh_wk_" + secrets.token_hex(24) for label in ("with", "without", "disabled", "old")}
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
        conn.execute(
            "update public.organization_limits set monthly_budget_microusd = %s, burst_per_minute = %s,"
            " widget_rpm_per_agent = %s, widget_rpm_per_visitor = %s where org_id = %s",
            (BIG * 1000, BIG, BIG, BIG, org_id),
        )
        with_knowledge = _agent(conn, org_id, keys["with"])
        _agent(conn, org_id, keys["without"])
        _agent(conn, org_id, keys["disabled"], enabled=False)
        rotated = _agent(conn, org_id, keys["old"])
        with conn.transaction():  # the server's path: rotation as service_role
            conn.execute("set local role service_role")
            conn.execute("select public.rotate_widget_key(%s)", (rotated,))
        for title, content in KNOWLEDGE:
            conn.execute(
                "insert into public.knowledge_chunks (org_id, agent_id, title, content) values (%s, %s, %s, %s)",
                (org_id, with_knowledge, title, content),
            )
    return Fixture(
        app_url=server.url(name, user="authenticator"),
        with_knowledge=keys["with"],
        without_knowledge=keys["without"],
        disabled=keys["disabled"],
        rotated_out=keys["old"],
    )


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Result:
    latencies: list[float]
    wall: float
    cpu_seconds: float = 0.0
    """CPU time the endpoint's server process spent while the requests were measured."""

    def add(self, other: Result) -> None:
        self.latencies += other.latencies
        self.wall += other.wall
        self.cpu_seconds += other.cpu_seconds

    @property
    def cpu_ms_per_request(self) -> float:
        return self.cpu_seconds * 1000 / len(self.latencies)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall


async def _chat_client(http: httpx.AsyncClient, url: str, count: int, latencies: list[float]) -> None:
    token: str | None = None
    turns = 0
    for i in range(count):
        headers = {"Origin": ORIGIN}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        started = time.perf_counter()
        response = await http.post(url, json={"message": QUESTIONS[i % len(QUESTIONS)]}, headers=headers)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"chat answered {response.status_code}: {response.text[:200]}")
        turns += 1
        token = response.json()["visitor_token"] if turns < TURNS_PER_CONVERSATION else None
        turns %= TURNS_PER_CONVERSATION


async def _baseline_client(http: httpx.AsyncClient, url: str, count: int, latencies: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        response = await http.post(url)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, *, chat: bool, requests: int, concurrency: int, server_pid: int) -> Result:
    per_client = max(1, requests // concurrency)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as http:
        client = _chat_client if chat else _baseline_client
        await asyncio.gather(*(client(http, url, min(per_client, 10), []) for _ in range(concurrency)))  # warm-up
        cpu_before = process_cpu_seconds(server_pid)
        started = time.perf_counter()
        await asyncio.gather(*(client(http, url, per_client, latencies) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = process_cpu_seconds(server_pid) - cpu_before
    return Result(latencies, wall, cpu)


def side_by_side(
    baseline_url: str, chat_url: str, *, requests: int, concurrency: int, blocks: int, pids: tuple[int, int]
) -> tuple[Result, Result]:
    """Baseline and chat in alternating blocks, so a change in the machine's load hits both alike."""
    base, chat = Result([], 0.0), Result([], 0.0)
    per_block = max(concurrency, requests // blocks)
    for _ in range(blocks):
        base.add(
            asyncio.run(load(baseline_url, chat=False, requests=per_block, concurrency=concurrency, server_pid=pids[0]))
        )
        chat.add(
            asyncio.run(load(chat_url, chat=True, requests=per_block, concurrency=concurrency, server_pid=pids[1]))
        )
    return base, chat


async def not_found_timing(base: str, fixture: Fixture, rounds: int) -> dict[str, float]:
    keys = {
        "unknown": "hh_wk_" + secrets.token_hex(24),
        "disabled": fixture.disabled,
        "rotated-out": fixture.rotated_out,
    }
    samples: dict[str, list[float]] = {name: [] for name in keys}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
        for _ in range(rounds):
            for name, key in keys.items():
                started = time.perf_counter()
                response = await http.get(f"{base}/api/widget/{key}/config", headers={"Origin": ORIGIN})
                samples[name].append(time.perf_counter() - started)
                assert response.status_code == 404, (name, response.status_code)
    return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="measured requests per endpoint and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--not-found-rounds", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=4, help="alternating baseline/chat blocks per row")
    args = parser.parse_args()

    fixture = build_database()
    token = secrets.token_urlsafe(24)
    processes: list[BaseProcess] = []
    try:
        bridge, bridge_url = _start(_run_bridge, token)
        model, (model_url, model_key) = _start(_run_fake_openai)
        processes += [bridge, model]
        env = {
            "ENVIRONMENT": "local",
            "DATABASE_URL": fixture.app_url,
            "UPSTASH_REDIS_REST_URL": bridge_url,
            "UPSTASH_REDIS_REST_TOKEN": token,
            "WIDGET_TOKEN_SECRET": secrets.token_urlsafe(32),
            "OPENAI_API_KEY": model_key,
            "OPENAI_BASE_URL": model_url,
        }
        key_hash = hashlib.sha256(fixture.without_knowledge.encode()).digest()
        widget, widget_port = _start(_run_server, "widget", env, key_hash)
        baseline, baseline_port = _start(_run_server, "baseline", env, key_hash)
        processes += [widget, baseline]
        widget_base = f"http://127.0.0.1:{widget_port}"
        baseline_url = f"http://127.0.0.1:{baseline_port}/baseline"

        print(
            f"cpus: {os.cpu_count()}; measured requests per row: {args.requests}, in {args.blocks} blocks "
            "alternating with the baseline; model: loopback, instant"
        )
        header = f"{'agent':<18}{'clients':>8}{'endpoint':>10}{'median ms':>11}{'p99 ms':>9}{'req/s':>9}{'cpu ms':>8}"
        print(header)
        print("-" * len(header))
        ratios = []
        for label, key in (
            ("with knowledge", fixture.with_knowledge),
            ("without knowledge", fixture.without_knowledge),
        ):
            for concurrency in args.concurrency:
                base, chat = side_by_side(
                    baseline_url,
                    f"{widget_base}/api/widget/{key}/chat",
                    requests=args.requests,
                    concurrency=concurrency,
                    blocks=args.blocks,
                    pids=(baseline.pid or 0, widget.pid or 0),
                )
                for name, result in (("baseline", base), ("chat", chat)):
                    print(
                        f"{label:<18}{concurrency:>8}{name:>10}{result.median_ms:>11.2f}{result.p99_ms:>9.2f}"
                        f"{result.rps:>9.0f}{result.cpu_ms_per_request:>8.2f}"
                    )
                ratios.append(
                    (
                        label,
                        concurrency,
                        chat.median_ms / base.median_ms,
                        chat.p99_ms / base.p99_ms,
                        chat.rps / base.rps,
                        chat.cpu_ms_per_request / base.cpu_ms_per_request,
                    )
                )
        print()
        print(f"{'agent':<18}{'clients':>8}{'median x':>10}{'p99 x':>8}{'req/s x':>9}{'cpu x':>8}   (chat / baseline)")
        for label, concurrency, median, p99, rps, cpu in ratios:
            print(f"{label:<18}{concurrency:>8}{median:>10.2f}{p99:>8.2f}{rps:>9.2f}{cpu:>8.2f}")

        timings = asyncio.run(not_found_timing(widget_base, fixture, args.not_found_rounds))
        print()
        print("404 for each kind of bad key (GET config, interleaved), median microseconds:")
        print("  " + ", ".join(f"{name} {value:.0f}" for name, value in timings.items()))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(10)


if __name__ == "__main__":
    main()
