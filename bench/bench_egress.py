"""Overhead of the egress guard.

1. Requests through `guarded_client` vs a plain `httpx.AsyncClient` against the same loopback server,
   keep-alive on both, alternating rounds; prints the median per-request ratio (target: under 1.15x).
2. The cost of one `check_url` call, for an IP literal and for a name (injected resolver, no DNS).

The server runs in its own process so its work is not billed to either client. Loopback only, bounded
in count. From the repo root: `PYTHONPATH=. .venv/bin/python bench/bench_egress.py [--requests 500] [--rounds 9]`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection

import httpx

from shared.egress import EgressPolicy, check_url, guarded_client

BODY = b'{"ok":true}'
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


async def _serve(ready: Connection, stop_after: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.send(server.sockets[0].getsockname()[1])
    async with server:
        await asyncio.sleep(stop_after)  # stops by itself even if the parent dies


def _server_process(ready: Connection, stop_after: float) -> None:
    asyncio.run(_serve(ready, stop_after))


class StaticResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def resolve(self, host: str, port: int) -> list[str]:  # noqa: ARG002 - the Resolver protocol
        return self.answers[host]


async def _round(client: httpx.AsyncClient, url: str, requests: int) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        response = await client.get(url)
        response.raise_for_status()
    return (time.perf_counter() - start) / requests


async def bench_clients(port: int, requests: int, rounds: int) -> None:
    policy = EgressPolicy(purpose="bench", allow_addresses=frozenset({f"127.0.0.1:{port}"}))
    resolver = StaticResolver({"bench.example": ["127.0.0.1"]})
    ratios, plain_times, guarded_times = [], [], []
    async with (
        httpx.AsyncClient(trust_env=False) as plain,
        guarded_client(policy=policy, resolver=resolver) as guarded,
    ):
        plain_url, guarded_url = f"http://127.0.0.1:{port}/", f"http://bench.example:{port}/"
        await _round(plain, plain_url, 50)  # warm both pools and code paths
        await _round(guarded, guarded_url, 50)
        for _ in range(rounds):
            plain_time = await _round(plain, plain_url, requests)
            guarded_time = await _round(guarded, guarded_url, requests)
            plain_times.append(plain_time)
            guarded_times.append(guarded_time)
            ratios.append(guarded_time / plain_time)
    print(f"requests: {rounds} rounds x {requests} keep-alive GETs per client, loopback")
    print(f"  plain httpx.AsyncClient  median {statistics.median(plain_times) * 1e6:8.1f} us/request")
    print(f"  guarded_client           median {statistics.median(guarded_times) * 1e6:8.1f} us/request")
    print(f"  median ratio guarded/plain: {statistics.median(ratios):.3f}x (target < 1.15x)")


async def bench_check_url(calls: int) -> None:
    resolver = StaticResolver({"customer.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    for label, url in (
        ("IP literal", "https://93.184.216.34/hook"),
        ("name, 2 answers", "https://customer.example/services/T0/B0/x"),
    ):
        start = time.perf_counter()
        for _ in range(calls):
            await check_url(url, resolver=resolver)
        per_call = (time.perf_counter() - start) / calls
        print(f"check_url ({label}): {per_call * 1e6:.1f} us/call over {calls} calls (no DNS)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--check-calls", type=int, default=5000)
    args = parser.parse_args()

    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.Process(target=_server_process, args=(send, 120.0), daemon=True)
    server.start()
    try:
        port = receive.recv()
        asyncio.run(bench_clients(port, args.requests, args.rounds))
        asyncio.run(bench_check_url(args.check_calls))
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
