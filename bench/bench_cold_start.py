"""Cold start: a fresh interpreter imports a function module and serves its first request.

Each function is compared with a bare FastAPI app doing the same (import, build, one request
through the ASGI app, in process), run alternately in fresh interpreters so noise hits both alike.
The first request is one that needs no database or network (liveness, a preflight, or a request
the validator refuses), so the figure is the function's own start-up cost.

    .venv/bin/python bench/bench_cold_start.py [--runs 7]

Target: median ratio under 1.5x for every function.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each function's first request is: (method, path, json body or None).
FIRST_REQUEST: dict[str, tuple[str, str, object]] = {
    "health": ("GET", "/api/health", None),
    "widget_chat": ("POST", "/api/widget/hh_wk_x/chat", {"unexpected": True}),
    "stripe_webhook": ("POST", "/api/stripe/webhook", None),
    "billing": ("POST", "/api/billing/checkout", {"card": {"number": "x"}}),
    "connection_verify": ("POST", "/api/connections", {}),
    "cron_deliveries": ("GET", "/api/cron/deliveries", None),
    "scan": ("POST", "/api/scans", {}),
    "cron_scans": ("GET", "/api/cron/scans", None),
}

PROGRAM = """
import time, asyncio
started = time.perf_counter()
{build}
import httpx
async def first():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        return await client.request({method!r}, {path!r}, json={body!r})
response = asyncio.run(first())
assert response.status_code < 500, response.text
print(time.perf_counter() - started)
"""

BARE = """
from fastapi import FastAPI
app = FastAPI()
@app.api_route({path!r}, methods=[{method!r}])
async def route() -> dict[str, str]:
    return {{"status": "ok"}}
"""


def run(code: str) -> float:
    env = {"PATH": "/usr/bin:/bin", "ENVIRONMENT": "local", "PYTHONDONTWRITEBYTECODE": "0"}
    out = subprocess.run(  # noqa: S603 - our own interpreter and program
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    available = {p.stem for p in (ROOT / "functions").glob("*.py")}
    print(f"{'function':<20} {'function ms':>12} {'bare ms':>10} {'ratio':>7}")
    for name, (method, path, body) in FIRST_REQUEST.items():
        if name not in available:
            continue
        ours = PROGRAM.format(build=f"from functions.{name} import app", method=method, path=path, body=body)
        bare = PROGRAM.format(build=BARE.format(path=path, method=method), method=method, path=path, body=body)
        run(ours)  # warm the file cache and bytecode once
        run(bare)
        ours_times, bare_times = [], []
        for _ in range(args.runs):
            ours_times.append(run(ours))
            bare_times.append(run(bare))
        o, b = statistics.median(ours_times) * 1000, statistics.median(bare_times) * 1000
        print(f"{name:<20} {o:>12.0f} {b:>10.0f} {o / b:>6.2f}x")


if __name__ == "__main__":
    main()
