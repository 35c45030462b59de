"""Cold start through Vercel's own entry: a fresh process loads a built function's handler and
answers its first request.

Each HTTP function of ``.vercel/output`` (``scripts/build``) is compared with a bare FastAPI app
built by the same pinned Vercel CLI with the same build settings (vercel.json's ``build.env``: both
ship precompiled bytecode), a throwaway project with FastAPI as its only dependency, and served the
same way: assembled from what it ships, started on the bare runtime interpreter through the
builder's ``vc__handler__python`` trampoline, port announced over the IPC socket, one request.
The time runs from starting the process to the first response. Runs alternate (function, bare,
function, ...) so the machine's noise hits both alike. The first request needs no database or
network (liveness, a preflight, or a request the validator refuses), so the figure is the
function's own start-up.

    scripts/build && PYTHONPATH=. .venv/bin/python bench/bench_cold_start.py [--runs 5] [--only widget health]

Target: median ratio at most 1.3x for every function.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from shared.local.build_output import (
    ROOT,
    BuiltFunction,
    Routes,
    build_environment,
    built_functions,
    output_config,
    serve,
)

# A first request per path that needs no database: (method, path, json body or None).
FIRST_REQUEST: dict[str, tuple[str, str, object]] = {
    "/api/health": ("GET", "/api/health", None),
    "/api/widget/:key/chat": ("POST", "/api/widget/hh_wk_x/chat", {"unexpected": True}),
    "/api/stripe/webhook": ("POST", "/api/stripe/webhook", None),
    "/api/billing/checkout": ("POST", "/api/billing/checkout", {"card": {"number": "x"}}),
    "/api/connections": ("POST", "/api/connections", {}),
    "/api/cron/deliveries": ("GET", "/api/cron/deliveries", None),
    "/api/scans": ("POST", "/api/scans", {}),
    "/api/cron/scans": ("GET", "/api/cron/scans", None),
    "/api/audit-log/export": ("GET", "/api/audit-log/export", None),
    "/api/invitations": ("POST", "/api/invitations", {}),
    "/api/cron/reconcile": ("GET", "/api/cron/reconcile", None),
    "/api/model-key": ("GET", "/api/model-key", None),
}
ENV = {"ENVIRONMENT": "local"}

BARE_APP = """from fastapi import FastAPI, Request

app = FastAPI()


@app.api_route("/{path:path}", methods=["GET", "POST"])
async def route(path: str, request: Request) -> dict[str, str]:
    await request.body()
    return {"status": "ok"}
"""


def build_bare(workdir: Path) -> BuiltFunction:
    """A FastAPI-only project built by this repository's pinned Vercel CLI."""
    (workdir / "functions").mkdir(parents=True)
    (workdir / "functions" / "bare.py").write_text(BARE_APP)
    (workdir / ".python-version").write_text((ROOT / ".python-version").read_text())
    (workdir / "pyproject.toml").write_text(
        '[project]\nname = "bare"\nversion = "0"\nrequires-python = ">=3.12"\ndependencies = ["fastapi>=0.115"]\n'
        "[tool.uv]\npackage = false\n"
    )
    (workdir / "vercel.json").write_text(
        json.dumps({"builds": [{"src": "functions/*.py", "use": "@vercel/python"}], "rewrites": []})
    )
    (workdir / ".vercel").mkdir()
    (workdir / ".vercel" / "project.json").write_text(
        '{"projectId": "prj_bench", "orgId": "team_local", "settings": {"framework": null}}'
    )
    python_dir = Path(os.path.realpath(getattr(sys, "_base_executable", sys.executable))).parent
    path = f"{ROOT / '.venv' / 'bin'}:{python_dir}:/usr/local/bin:/usr/bin:/bin"
    # Built with the same build settings as ours (vercel.json's build.env: precompiled bytecode).
    env = {**os.environ, **build_environment(), "PATH": path, "VERCEL_TELEMETRY_DISABLED": "1"}
    build = subprocess.run(  # noqa: S603 - the pinned CLI on a project we just wrote
        [str(ROOT / "node_modules" / ".bin" / "vercel"), "build", "--yes"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if build.returncode:
        raise SystemExit(f"building the bare app failed:\n{build.stdout}\n{build.stderr}")
    (bare,) = built_functions(workdir / ".vercel" / "output")
    return bare


def first_response_seconds(function: BuiltFunction, request: tuple[str, str, object], instance: str) -> float:
    method, path, body = request
    started = time.perf_counter()
    with serve(function, ENV, instance=instance, reuse=True) as served:
        response = httpx.request(method, served.base_url + path, json=body, timeout=60)
        elapsed = time.perf_counter() - started
    if response.status_code >= 500:
        raise RuntimeError(f"{function.name}: {method} {path} -> {response.status_code} {response.text}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=[], help="function names containing any of these")
    args = parser.parse_args()
    routes = Routes(output_config())
    functions = [
        f
        for f in built_functions()
        if not f.config.get("experimentalTriggers") and (not args.only or any(o in f.name for o in args.only))
    ]
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as workdir:
        bare = build_bare(Path(workdir))
        print(f"{'function':<40} {'first response ms':>18} {'bare ms':>9} {'ratio':>7}")
        for function in functions:
            requests = [
                r for r in FIRST_REQUEST.values() if getattr(routes.resolve(r[1]), "function", "") == function.name
            ]
            if not requests:
                print(f"{function.name:<40} (no first request defined in this bench)")
                continue
            request = requests[0]
            first_response_seconds(function, request, ".bench")  # assemble once, warm the file cache
            first_response_seconds(bare, request, ".bench")
            ours, theirs = [], []
            for _ in range(args.runs):
                ours.append(first_response_seconds(function, request, ".bench"))
                theirs.append(first_response_seconds(bare, request, ".bench"))
            o, b = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
            print(f"{function.name:<40} {o:>18.0f} {b:>9.0f} {o / b:>6.2f}x", flush=True)
        shutil.rmtree(ROOT / ".vercel" / "assembled", ignore_errors=True)


if __name__ == "__main__":
    main()
