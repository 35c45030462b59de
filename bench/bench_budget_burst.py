"""A burst against a small budget: how many of 200 simultaneous visitors get an answer, and by how
much settled spend passes the budget, today against the behaviour before budgets could lower a
call's reply allowance or wait for holds in flight (the baseline).

Each run, in a process of its own:

* Postgres: the embedded server, a fresh database with that code's migrations;
* the model: the loopback OpenAI-compatible server of the tests, answering each chat after
  ``--latency`` seconds (a model is never instant, so the burst's holds are all in flight together)
  with a typical call's usage: 600 prompt and 120 completion tokens (162 µ$ on gpt-4o-mini);
* one organization whose monthly budget has room for ``--room`` such calls (50: 8,100 µ$), and
  ``--calls`` (200) simultaneous ``gateway.chat`` calls with a widget-sized prompt (instructions, five
  knowledge excerpts, the widget's tools; about 3 KB) and ``max_tokens=400``, each reserving its
  worst case before it is sent. The burst limit is passed in advance (a ``BurstPass``): this
  measures the budget, not Redis.

The baseline is the code at ``--baseline-ref`` (``git archive`` into a temporary folder; nothing in
the repository is written) run by this same script with that folder first on ``PYTHONPATH``. Runs
alternate between the two (``--rounds``). Reported per run and summed: answered, refused (402),
other errors, settled spend and overshoot (spend above the budget; target 0), the share of the
budget spent, and the reply allowances sent to the model.

From the repo root:

    PYTHONPATH=. .venv/bin/python bench/bench_budget_burst.py [--rounds 3] [--baseline-ref 942336f]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIG = 1_000_000_000
PROMPT_TOKENS, COMPLETION_TOKENS = 600, 120  # a typical widget call, as the provider reports it
INSTRUCTIONS = (
    "You answer questions from visitors of Acme Bikes, a bicycle shop. Keep replies short and answer only "
    "from the documentation excerpts you are given. Call escalate when the visitor asks for a person."
)
EXCERPT = (
    "Orders can be returned within 30 days with the receipt. Refunds go back to the original card within "
    "five working days. Bikes that were ridden can be returned if they show no wear; e-bikes need their "
    "battery and charger. Our workshop repairs every brand; book a slot online or call the shop. "
)


# -- one run (a child process, with the code under test first on PYTHONPATH) -----------------------


async def _burst(calls: int, room: int, latency: float) -> dict[str, Any]:
    import psycopg

    from shared.db.pool import close_pools
    from shared.db.session import get_database
    from shared.errors import BudgetExhausted
    from shared.gateway import WIDGET_TOOLS, BurstPass, ChatMessage, ChatResult, chat, close_clients
    from shared.local.database import apply_schema, create_database, start_server
    from shared.pricing import cost_microusd
    from shared.settings import get_settings
    from tests.fakes.openai_server import start_fake_openai

    server = start_server(Path(tempfile.gettempdir()) / "hiredhands-bench-budget-pg")
    name = f"hh_bench_budget_{os.getpid()}"
    create_database(server, name, replace=True)
    admin_url = server.url(name)
    apply_schema(admin_url, seed=False)
    typical = cost_microusd("gpt-4o-mini", prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS)
    budget = room * typical
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
            "update public.organization_limits set monthly_budget_microusd = %s, burst_per_minute = %s"
            " where org_id = %s",
            (budget, BIG, org_id),
        )

    fake = start_fake_openai()
    fake.delay_seconds = latency
    fake.reply.prompt_tokens, fake.reply.completion_tokens = PROMPT_TOKENS, COMPLETION_TOKENS
    os.environ.update(
        DATABASE_URL=server.url(name, user="authenticator"),
        OPENAI_API_KEY=fake.api_key,
        OPENAI_BASE_URL=fake.base_url,
        MODEL_TIMEOUT_SECONDS="30",
        # 200 calls queue for the pool's connections and for the organization's row lock; on this
        # shared machine that can pass the 3 s default, which is a pool figure, not a budget one.
        DB_CONNECT_TIMEOUT_SECONDS="30",
    )
    get_settings.cache_clear()
    messages = [
        ChatMessage("system", INSTRUCTIONS),
        ChatMessage("system", "\n".join(f"<excerpt>{EXCERPT}</excerpt>" for _ in range(5))),
        ChatMessage("user", "Can I return an e-bike I rode once?"),
    ]
    burst_pass = BurstPass(org_id, calls)  # the burst limit counted in advance: not what is measured

    async def one(i: int) -> ChatResult:
        return await chat(
            get_database(),
            org_id=org_id,
            agent_id=None,
            conversation_id=None,
            model="gpt-4o-mini",
            messages=messages,
            tools=WIDGET_TOOLS,
            max_tokens=400,
            request_id=f"bench-{i}",
            burst_per_minute=BIG,
            burst_pass=burst_pass,
        )

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(i) for i in range(calls)), return_exceptions=True)
    wall = time.perf_counter() - started
    await close_clients()
    await close_pools()
    fake.stop()

    with psycopg.connect(admin_url, autocommit=True) as conn:
        period = conn.execute(
            "select spent_microusd, reserved_microusd from public.budget_periods where org_id = %s", (org_id,)
        ).fetchone()
        holds = conn.execute(
            "select amount_microusd from public.budget_reservations where org_id = %s", (org_id,)
        ).fetchall()
    spent, reserved = period or (0, 0)
    allowances = Counter(r.body.get("max_completion_tokens") for r in fake.requests_to("/v1/chat/completions"))
    answered = sum(isinstance(o, ChatResult) for o in outcomes)
    refused = sum(isinstance(o, BudgetExhausted) for o in outcomes)
    return {
        "answered": answered,
        "refused": refused,
        "other": calls - answered - refused,
        "other_kinds": sorted({repr(o) for o in outcomes if not isinstance(o, ChatResult | BudgetExhausted)}),
        "budget": budget,
        "spent": spent,
        "reserved_after": reserved,
        "overshoot": max(0, spent - budget),
        "hold_median": statistics.median(h[0] for h in holds) if holds else 0,
        "allowances": {str(k): v for k, v in sorted(allowances.items(), key=lambda kv: -(kv[0] or 0))},
        "wall_s": round(wall, 2),
    }


# -- the comparison ---------------------------------------------------------------------------------


def _baseline_tree(ref: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="hh-bench-baseline-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout  # noqa: S603, S607
    with tempfile.TemporaryFile() as tar_file:
        tar_file.write(archive)
        tar_file.seek(0)
        with tarfile.open(fileobj=tar_file) as tar:
            tar.extractall(folder, filter="data")
    return folder


def _run(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    for name in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "UPSTASH_REDIS_REST_URL"):
        env.pop(name, None)
    command = [sys.executable, __file__, "--once", f"--calls={args.calls}", f"--room={args.room}"]
    command.append(f"--latency={args.latency}")
    done = subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)  # noqa: S603
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--room", type=int, default=50, help="typical calls the budget has room for")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the model takes to answer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-ref", default="942336f", help="the code before lowering and waiting")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.once:
        os.environ["MODEL_TIMEOUT_SECONDS"] = "30"
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the gateway's log lines, one per call
        print(json.dumps(asyncio.run(_burst(args.calls, args.room, args.latency))))
        return

    baseline = _baseline_tree(args.baseline_ref)
    print(f"{args.calls} simultaneous calls, budget room for {args.room} typical calls, model latency {args.latency}s")
    print(f"baseline: {args.baseline_ref}; current: the working tree\n")
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    for round_ in range(args.rounds):
        order = ["baseline", "current"] if round_ % 2 == 0 else ["current", "baseline"]
        for label in order:
            result = _run(baseline if label == "baseline" else REPO, args)
            results[label].append(result)
            print(f"round {round_ + 1} {label:>8}: {json.dumps(result)}")
    print()
    print(f"{'':>22} {'baseline':>12} {'current':>12}")
    for key, label in [
        ("answered", "answered (of calls)"),
        ("refused", "refused (402)"),
        ("other", "other errors"),
        ("overshoot", "overshoot (µ$)"),
    ]:
        base, current = (statistics.mean(r[key] for r in results[name]) for name in ("baseline", "current"))
        print(f"{label:>22} {base:>12.1f} {current:>12.1f}")
    for name in ("baseline", "current"):
        used = statistics.mean(r["spent"] / r["budget"] for r in results[name])
        print(f"{'budget spent, ' + name:>22} {used:>12.0%}")
    ratio = statistics.mean(r["answered"] for r in results["current"]) / max(
        1e-9, statistics.mean(r["answered"] for r in results["baseline"])
    )
    print(f"\nanswered, current / baseline: {ratio:.1f}x (target: >= 40 answered, 0 overshoot)")


if __name__ == "__main__":
    main()
