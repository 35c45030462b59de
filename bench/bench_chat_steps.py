"""Where the JSON chat turn's time goes: each of its I/O steps on its own, beside the same-I/O baseline's.

``bench_stream.py`` compares a whole turn with a bare endpoint making the same I/O. This bench takes
the turn apart. Same machinery (embedded Postgres, the Redis REST bridge, the loopback model answering
at once, each in its own process); here the steps are called in this process, in the turn's order,
through the product's own functions, and each is timed: wall time and this process's CPU time.

- chat: the context read, the per-visitor limit, the per-agent and burst limits, the embedding's
  reservation, the embedding call, its usage row and settlement, the search, the reply's reservation,
  the chat call, its usage row and settlement, and storing the turn (7 Postgres round trips, 2 Redis
  requests, 2 model requests);
- same I/O: what the baseline endpoint of ``bench_stream.py`` does for the same steps (a ``select``
  as the server through ``run_as_service`` for each round trip, ``INCR`` for each Redis request, the
  model's two endpoints answered as bytes).

Turns alternate between the two sides in blocks. Printed: the median per step and per kind of I/O,
and the sums. What a step costs beyond its baseline counterpart is the turn's own work in that step.

From the repo root (needs redis-server on 127.0.0.1:6379):

    PYTHONPATH=. .venv/bin/python bench/bench_chat_steps.py [--turns 300] [--blocks 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from bench.bench_stream import _run_model
from bench.bench_widget import QUESTIONS, _run_bridge, _start, build_database


class Timings:
    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.cpu: dict[str, list[float]] = defaultdict(list)
        self.kinds: dict[str, str] = {}

    async def run(self, kind: str, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        self.kinds[name] = kind
        wall, cpu = time.perf_counter(), time.thread_time()
        result = await call()
        self.wall[name].append(time.perf_counter() - wall)
        self.cpu[name].append(time.thread_time() - cpu)
        return result

    def median(self, name: str) -> tuple[float, float]:
        return statistics.median(self.wall[name]) * 1000, statistics.median(self.cpu[name]) * 1000


async def measure(key: str, turns: int, blocks: int) -> tuple[Timings, Timings]:
    from shared import budgets, metering
    from shared.db.session import get_database, run_as_service
    from shared.gateway import WIDGET_TOOLS, admit_burst, provider
    from shared.gateway.schemas import ChatMessage
    from shared.ratelimit import LimitCheck, RateLimitRule, hit
    from shared.redis import get_redis
    from shared.retrieval import search_knowledge
    from shared.settings import get_settings
    from shared.widget import queries, service
    from shared.widget.keys import hash_key
    from shared.widget.schemas import HISTORY_MESSAGES

    db, redis = get_database(), get_redis()
    config = provider.config_from(get_settings())
    assert config is not None
    client = provider._client(config)
    question = QUESTIONS[1]
    chat, same = Timings(), Timings()

    # A conversation with history, as most turns of the load have.
    conversation_id, visitor_id = uuid.uuid4(), "v_" + secrets.token_hex(8)
    first = await queries.chat_context(
        db, key_hash=hash_key(key), conversation_id=None, visitor_id=None, history_limit=HISTORY_MESSAGES
    )
    assert first is not None
    org_id, agent_id = first.org_id, first.agent_id

    async def chat_turn(t: Timings) -> None:
        context = await t.run(
            "postgres",
            "context read",
            lambda: queries.chat_context(
                db,
                key_hash=hash_key(key),
                conversation_id=conversation_id,
                visitor_id=visitor_id,
                history_limit=HISTORY_MESSAGES,
            ),
        )
        await t.run(
            "redis",
            "per-visitor limit",
            lambda: hit(
                redis, bucket=service.VISITOR_BUCKET, identifier=f"{agent_id}:v", limit=10**9, window_seconds=60
            ),
        )
        by_agent = LimitCheck(RateLimitRule(service.AGENT_BUCKET, 10**9, 60), str(agent_id))
        await t.run(
            "redis",
            "per-agent and burst limits",
            lambda: admit_burst(
                org_id=org_id, burst_per_minute=10**9, calls=2, request_id="req_bench", preceded_by=[by_agent]
            ),
        )
        held = await t.run(
            "postgres",
            "embedding reservation",
            lambda: budgets.reserve_within(db, org_id=org_id, amount_microusd=20, floor_microusd=20),
        )
        vectors = await t.run(
            "model",
            "embedding call",
            lambda: provider.embed(
                config, model="text-embedding-3-small", texts=[question], dimensions=1536, request_id="r"
            ),
        )
        usage = metering.Usage(
            org_id=org_id, kind="embedding", model="text-embedding-3-small", outcome="ok", request_id="req_bench"
        )
        await t.run("postgres", "embedding usage row", lambda: metering.record(db, usage, reservation_id=held.id))
        chunks = await t.run(
            "postgres",
            "search",
            lambda: search_knowledge(
                db, agent_id=agent_id, query=question, query_embedding=vectors.vectors[0], limit=4
            ),
        )
        held = await t.run(
            "postgres",
            "reply reservation",
            lambda: budgets.reserve_within(db, org_id=org_id, amount_microusd=600, floor_microusd=100),
        )
        knowledge = "\n".join(f"<excerpt>{chunk.content}</excerpt>" for chunk in chunks)
        prompt: list[ChatMessage] = service.model_messages(context, question)
        messages: list[tuple[Any, str]] = [("system", knowledge), *((m.role, m.content) for m in prompt)]
        completion = await t.run(
            "model",
            "chat call",
            lambda: provider.complete(
                config,
                model="gpt-4o-mini",
                messages=messages,
                tools=WIDGET_TOOLS,
                max_tokens=400,
                temperature=0.3,
                request_id="r",
            ),
        )
        usage = metering.Usage(org_id=org_id, kind="chat", model="gpt-4o-mini", outcome="ok", request_id="req_bench")
        usage_id = await t.run(
            "postgres", "reply usage row", lambda: metering.record(db, usage, reservation_id=held.id)
        )
        received = datetime.now(UTC)
        await t.run(
            "postgres",
            "store the turn",
            lambda: queries.store_turn(
                db,
                conversation_id=conversation_id,
                org_id=org_id,
                agent_id=agent_id,
                visitor_id=visitor_id,
                origin=None,
                messages=[
                    queries.NewMessage("visitor", question, received),
                    queries.NewMessage(
                        "agent", completion.content, received, model="gpt-4o-mini", usage_event_id=usage_id
                    ),
                ],
                items=[],
            ),
        )

    chat_body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": question}],
        "max_completion_tokens": 400,
        "tools": WIDGET_TOOLS,
    }
    embedding_body = {"model": "text-embedding-3-small", "input": [question], "encoding_format": "base64"}

    async def same_io(t: Timings) -> None:
        async def select() -> Any:
            return await run_as_service(db, "select %(n)s::int as n", {"n": 1})

        await t.run("postgres", "context read", select)
        await t.run("redis", "per-visitor limit", lambda: redis.incr("bench:steps:a"))
        await t.run("redis", "per-agent and burst limits", lambda: redis.incr("bench:steps:b"))
        await t.run("postgres", "embedding reservation", select)
        await t.run("model", "embedding call", lambda: client.post("/embeddings", cast_to=bytes, body=embedding_body))
        for name in ("embedding usage row", "search", "reply reservation"):
            await t.run("postgres", name, select)
        await t.run("model", "chat call", lambda: client.post("/chat/completions", cast_to=bytes, body=chat_body))
        for name in ("reply usage row", "store the turn"):
            await t.run("postgres", name, select)

    warm = Timings()
    for _ in range(10):  # connections, caches and the conversation's first rows
        await chat_turn(warm)
        await same_io(warm)
    per_block = max(1, turns // blocks)
    for _ in range(blocks):
        for _ in range(per_block):
            await chat_turn(chat)
        for _ in range(per_block):
            await same_io(same)
    return chat, same


def report(chat: Timings, same: Timings) -> None:
    header = f"{'step':<28}{'kind':<10}{'chat wall':>10}{'cpu':>7}{'same wall':>11}{'cpu':>7}{'extra wall':>12}"
    print(header)
    print("-" * len(header))
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for name, kind in chat.kinds.items():
        (cw, cc), (sw, sc) = chat.median(name), same.median(name)
        for i, value in enumerate((cw, cc, sw, sc)):
            totals[kind][i] += value
            totals["all"][i] += value
        print(f"{name:<28}{kind:<10}{cw:>10.2f}{cc:>7.2f}{sw:>11.2f}{sc:>7.2f}{cw - sw:>12.2f}")
    print("-" * len(header))
    for kind in ("postgres", "redis", "model", "all"):
        cw, cc, sw, sc = totals[kind]
        print(f"{'sum of medians':<28}{kind:<10}{cw:>10.2f}{cc:>7.2f}{sw:>11.2f}{sc:>7.2f}{cw - sw:>12.2f}")
    print("(ms; wall and CPU of this process per step, medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=300, help="measured turns per side")
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()

    fixture = build_database()
    token = secrets.token_urlsafe(24)
    bridge, bridge_url = _start(_run_bridge, token)
    model, (model_url, model_key) = _start(_run_model, 0.0, 0.0)
    try:
        os.environ.update(
            {
                "ENVIRONMENT": "local",
                "DATABASE_URL": fixture.app_url,
                "UPSTASH_REDIS_REST_URL": bridge_url,
                "UPSTASH_REDIS_REST_TOKEN": token,
                "WIDGET_TOKEN_SECRET": secrets.token_urlsafe(32),
                "OPENAI_API_KEY": model_key,
                "OPENAI_BASE_URL": model_url,
            }
        )
        print(f"cpus: {os.cpu_count()}; turns per side: {args.turns}, in {args.blocks} alternating blocks")
        chat, same = asyncio.run(measure(fixture.with_knowledge, args.turns, args.blocks))
        report(chat, same)
    finally:
        for process in (bridge, model):
            process.terminate()
            process.join(10)


if __name__ == "__main__":
    main()
