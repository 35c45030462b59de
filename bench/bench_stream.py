"""Streamed replies: time to first token through /chat, and the chat path against a same-I/O baseline.

Same machinery as ``bench_widget.py`` (embedded Postgres, the Redis REST bridge, the loopback model,
each server in its own process; blocks alternate so the machine's load hits both sides alike).

1. **Time to first token.** The loopback model waits ``--first-token`` seconds before its first
   token and then sends one word every ``--interval`` seconds. Measured with one httpx client:
   the time to the first text of a streamed chat completion asked of the model directly, and the
   time to the first ``delta`` event of ``POST /api/widget/{key}/chat`` with ``Accept:
   text/event-stream`` (agent with knowledge: the embedding, the search and the reservation all
   come before the model's first token). Target: ratio of medians and of p99s <= 1.1x at 1 client,
   <= 1.3x at 50.
2. **The chat path against a same-I/O baseline.** The JSON chat path with an instantly answering
   model, against a bare endpoint (same ``create_app``) that makes the same I/O with the same
   clients and nothing else: for the agent with knowledge 7 Postgres round trips (the same pool,
   each a transaction as the server through ``run_as_service``, as every statement of the chat path),
   2 Redis requests (the same Upstash client) and 2 model requests (an embedding and a chat
   completion, through the gateway's own openai SDK client, answers taken as bytes); without
   knowledge 4, 2 and 1. Target: median <= 1.5x at 1 and 50 clients; CPU per request for both.

From the repo root (needs redis-server on 127.0.0.1:6379):

    PYTHONPATH=. .venv/bin/python bench/bench_stream.py [--requests 200] [--concurrency 1 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import httpx

from bench.bench_widget import (
    ORIGIN,
    QUESTIONS,
    Result,
    _listener,
    _quiet,
    _run_bridge,
    _start,
    build_database,
    load,
)

REPLY = "Our shop is open from nine to six on weekdays."


def _run_model(ready: Connection, first_token: float, interval: float) -> None:
    _quiet()
    from tests.fakes.openai_server import start_fake_openai

    fake = start_fake_openai()
    fake.reply.content = REPLY
    fake.first_token_seconds = first_token
    fake.token_interval_seconds = interval
    ready.send((fake.base_url, fake.api_key))
    assert fake._thread is not None
    fake._thread.join()


def _same_io_app(round_trips: int, model_requests: int) -> Any:
    """An endpoint doing the chat path's I/O and nothing else."""
    from fastapi import APIRouter

    from shared.db.session import get_database, run_as_service
    from shared.gateway import provider
    from shared.redis import get_redis
    from shared.settings import get_settings
    from shared.web.app import create_app

    router = APIRouter()
    from shared.gateway import WIDGET_TOOLS

    # Requests shaped like the widget's: its tools, a system prompt and the question; embeddings as base64.
    chat_body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You answer for Acme Bikes."},
            {"role": "user", "content": "What are your opening hours?"},
        ],
        "max_completion_tokens": 400,
        "tools": WIDGET_TOOLS,
    }
    embedding_body = {"model": "text-embedding-3-small", "input": ["q"], "encoding_format": "base64"}

    @router.post("/same-io")
    async def same_io() -> dict[str, int]:
        db = get_database()
        redis = get_redis()
        config = provider.config_from(get_settings())
        assert config is not None
        client = provider._client(config)
        await redis.incr("bench:same-io:a")
        await redis.incr("bench:same-io:b")
        for i in range(round_trips):
            # As every statement of the chat path goes: its own transaction as the server (the role
            # and claims set first, then the statement and the commit, in one round trip).
            await run_as_service(db, "select %(n)s::int as n", {"n": i})
            if i == 0 and model_requests == 2:
                await client.post("/embeddings", cast_to=bytes, body=embedding_body)
        await client.post("/chat/completions", cast_to=bytes, body=chat_body)
        return {"ok": 1}

    return create_app("bench_same_io", [router])


def _run_same_io(ready: Connection, env: dict[str, str], round_trips: int, model_requests: int) -> None:
    os.environ.update(env)
    _quiet()
    import uvicorn

    listener = _listener()
    ready.send(listener.getsockname()[1])
    config = uvicorn.Config(
        _same_io_app(round_trips, model_requests), lifespan="off", ws="none", log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=[listener])


def _run_widget(ready: Connection, env: dict[str, str]) -> None:
    os.environ.update(env)
    _quiet()
    import uvicorn

    from functions.external.widget_chat import app

    listener = _listener()
    ready.send(listener.getsockname()[1])
    config = uvicorn.Config(app, lifespan="off", ws="none", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])


def _serving(target: Any, *args: Any) -> tuple[BaseProcess, int]:
    """Start a server process and wait until its port accepts connections (it listens only once
    uvicorn has started)."""
    process, port = _start(target, *args)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- time to first token --------------------------------------------------------------------------


async def _first_delta_direct(http: httpx.AsyncClient, model_url: str, model_key: str) -> float:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    headers = {"Authorization": f"Bearer {model_key}"}
    async with http.stream("POST", f"{model_url}/chat/completions", json=body, headers=headers) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0]["delta"].get("content"):
                    first = time.perf_counter() - started
    assert first is not None
    return first


async def _first_delta_chat(http: httpx.AsyncClient, url: str, token: str | None) -> tuple[float, str | None]:
    headers = {"Origin": ORIGIN, "Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    started = time.perf_counter()
    first = None
    name = None
    async with http.stream("POST", url, json={"message": QUESTIONS[1]}, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"chat answered {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name == "delta" and first is None:
                first = time.perf_counter() - started
            elif line.startswith("data: ") and name == "conversation":
                token = json.loads(line[6:])["visitor_token"]
    assert first is not None
    return first, token


async def ttft_block(*, direct: bool, url: str, model_key: str, requests: int, concurrency: int) -> list[float]:
    samples: list[float] = []
    per_client = max(1, requests // concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient, count: int, into: list[float]) -> None:
        token = None
        for turn in range(count):
            if direct:
                into.append(await _first_delta_direct(http, url, model_key))
            else:
                first, token = await _first_delta_chat(http, url, token if turn % 20 else None)
                into.append(first)

    async with httpx.AsyncClient(limits=limits, timeout=60, trust_env=False) as http:
        await asyncio.gather(*(client(http, 2, []) for _ in range(concurrency)))  # warm-up
        await asyncio.gather(*(client(http, per_client, samples) for _ in range(concurrency)))
    return samples


def _median_p99(values: list[float]) -> tuple[float, float]:
    result = Result(values, 1.0)
    return result.median_ms, result.p99_ms


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="measured requests per side and row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--first-token", type=float, default=0.5, help="seconds before the model's first token")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between the model's tokens")
    parser.add_argument("--skip", choices=["ttft", "same-io"], default=None)
    args = parser.parse_args()

    fixture = build_database()
    token = secrets.token_urlsafe(24)
    processes: list[BaseProcess] = []
    try:
        bridge, bridge_url = _start(_run_bridge, token)
        paced, (paced_url, paced_key) = _start(_run_model, args.first_token, args.interval)
        instant, (instant_url, instant_key) = _start(_run_model, 0.0, 0.0)
        processes += [bridge, paced, instant]
        env = {
            "ENVIRONMENT": "local",
            "DATABASE_URL": fixture.app_url,
            "UPSTASH_REDIS_REST_URL": bridge_url,
            "UPSTASH_REDIS_REST_TOKEN": token,
            "WIDGET_TOKEN_SECRET": secrets.token_urlsafe(32),
        }
        print(f"cpus: {os.cpu_count()}; blocks alternate; measured requests per side and row: {args.requests}")

        if args.skip != "ttft":
            widget, port = _serving(_run_widget, {**env, "OPENAI_API_KEY": paced_key, "OPENAI_BASE_URL": paced_url})
            processes.append(widget)
            chat_url = f"http://127.0.0.1:{port}/api/widget/{fixture.with_knowledge}/chat"
            print()
            print(
                f"time to first token (model: first token after {args.first_token * 1000:.0f} ms, then one every"
                f" {args.interval * 1000:.0f} ms; agent with knowledge)"
            )
            header = (
                f"{'clients':>8}{'direct med':>12}{'chat med':>10}{'x':>6}{'direct p99':>12}{'chat p99':>10}{'x':>6}"
            )
            print(header)
            print("-" * len(header))
            for concurrency in args.concurrency:
                direct: list[float] = []
                chat: list[float] = []
                per_block = max(concurrency, args.requests // args.blocks)
                for _ in range(args.blocks):
                    direct += asyncio.run(
                        ttft_block(
                            direct=True, url=paced_url, model_key=paced_key, requests=per_block, concurrency=concurrency
                        )
                    )
                    chat += asyncio.run(
                        ttft_block(
                            direct=False, url=chat_url, model_key="", requests=per_block, concurrency=concurrency
                        )
                    )
                (dm, dp), (cm, cp) = _median_p99(direct), _median_p99(chat)
                print(f"{concurrency:>8}{dm:>12.1f}{cm:>10.1f}{cm / dm:>6.2f}{dp:>12.1f}{cp:>10.1f}{cp / dp:>6.2f}")
            widget.terminate()

        if args.skip != "same-io":
            model_env = {**env, "OPENAI_API_KEY": instant_key, "OPENAI_BASE_URL": instant_url}
            widget, port = _serving(_run_widget, model_env)
            processes.append(widget)
            print()
            print("the JSON chat path against a same-I/O baseline (model: loopback, instant)")
            header = (
                f"{'agent':<18}{'clients':>8}{'endpoint':>10}{'median ms':>11}{'p99 ms':>9}{'req/s':>9}{'cpu ms':>8}"
            )
            print(header)
            print("-" * len(header))
            ratios = []
            for label, key, round_trips, model_requests in (
                ("with knowledge", fixture.with_knowledge, 7, 2),
                ("without knowledge", fixture.without_knowledge, 4, 1),
            ):
                same_io, same_port = _serving(_run_same_io, model_env, round_trips, model_requests)
                processes.append(same_io)
                for concurrency in args.concurrency:
                    base, chat_result = Result([], 0.0), Result([], 0.0)
                    per_block = max(concurrency, args.requests // args.blocks)
                    for _ in range(args.blocks):
                        base.add(
                            asyncio.run(
                                load(
                                    f"http://127.0.0.1:{same_port}/same-io",
                                    chat=False,
                                    requests=per_block,
                                    concurrency=concurrency,
                                    server_pid=same_io.pid or 0,
                                )
                            )
                        )
                        chat_result.add(
                            asyncio.run(
                                load(
                                    f"http://127.0.0.1:{port}/api/widget/{key}/chat",
                                    chat=True,
                                    requests=per_block,
                                    concurrency=concurrency,
                                    server_pid=widget.pid or 0,
                                )
                            )
                        )
                    for name, result in (("same I/O", base), ("chat", chat_result)):
                        print(
                            f"{label:<18}{concurrency:>8}{name:>10}{result.median_ms:>11.2f}{result.p99_ms:>9.2f}"
                            f"{result.rps:>9.0f}{result.cpu_ms_per_request:>8.2f}"
                        )
                    ratios.append(
                        (
                            label,
                            concurrency,
                            chat_result.median_ms / base.median_ms,
                            chat_result.p99_ms / base.p99_ms,
                            chat_result.cpu_ms_per_request / base.cpu_ms_per_request,
                        )
                    )
                same_io.terminate()
            print()
            print(f"{'agent':<18}{'clients':>8}{'median x':>10}{'p99 x':>8}{'cpu x':>8}   (chat / same I/O)")
            for label, concurrency, median, p99, cpu in ratios:
                print(f"{label:<18}{concurrency:>8}{median:>10.2f}{p99:>8.2f}{cpu:>8.2f}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(10)


if __name__ == "__main__":
    main()
