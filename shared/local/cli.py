"""``hiredhands``: the local stack.

hiredhands db    embedded Postgres with bootstrap, migrations and seed; prints DATABASE_URL first
hiredhands dev   the whole stack: database, Redis behind the Upstash REST bridge, every function
                 on one port at its vercel.json paths, the vercel.json crons on their schedules,
                 the queue dev server and its subscribers, and the demo site (shared/local/demo.py)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from shared.local.crons import crons, start_scheduler
from shared.local.database import LocalServer, apply_schema, create_database, start_server

ROOT = Path(__file__).resolve().parents[2]
LOCAL_DIR = ROOT / ".local"
DATABASE = "hiredhands"

DEMO_USER = {"id": "00000000-0000-4000-8000-000000000001", "email": "demo@hiredhands.dev"}
DEMO_WIDGET_KEY = "hh_wk_demo_local_only_0000000000000000"


def _start_database() -> LocalServer:
    LOCAL_DIR.mkdir(exist_ok=True)
    server = start_server(LOCAL_DIR / "pgdata")
    # A fresh database on every start: local demo data is disposable and the seed stays exact.
    create_database(server, DATABASE, replace=True)
    apply_schema(server.url(DATABASE), seed=True)
    return server


def _wait_forever() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


def cmd_db(_: argparse.Namespace) -> None:
    server = _start_database()
    print(f"DATABASE_URL={server.url(DATABASE, user='authenticator')}", flush=True)
    print(f"ADMIN_DATABASE_URL={server.url(DATABASE)}", flush=True)
    _wait_forever()


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    if _port_open("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0", None
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("No Redis on 127.0.0.1:6379 and no redis-server to start; install redis-server.")
    port = _free_port()
    process = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(50):
        if _port_open("127.0.0.1", port):
            break
        time.sleep(0.1)
    return f"redis://127.0.0.1:{port}/0", process


def _serve_in_thread(app: object, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(100):
        if _port_open("127.0.0.1", port):
            return
        time.sleep(0.05)


def _local_environment(database_url: str, redis_rest_url: str, redis_token: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "local",
        "DATABASE_URL": database_url,
        "UPSTASH_REDIS_REST_URL": redis_rest_url,
        "UPSTASH_REDIS_REST_TOKEN": redis_token,
        # Local-only secrets, fresh for each run, never written to disk.
        "SUPABASE_JWT_SECRET": secrets.token_urlsafe(32),
        "WIDGET_TOKEN_SECRET": secrets.token_urlsafe(32),
        "CREDENTIAL_KEYS": "local1:" + base64.b64encode(secrets.token_bytes(32)).decode(),
        # The local scheduler (shared/local/crons.py) calls the cron paths with it, as Vercel Cron does.
        "CRON_SECRET": secrets.token_urlsafe(32),
    }


def cmd_dev(args: argparse.Namespace) -> None:
    server = _start_database()
    redis_url, redis_process = _ensure_redis()

    from shared.local.redis_bridge import create_bridge

    redis_token = secrets.token_urlsafe(24)
    bridge_port = _free_port()
    _serve_in_thread(create_bridge(redis_url, redis_token), bridge_port)

    os.environ.update(
        _local_environment(server.url(DATABASE, user="authenticator"), f"http://127.0.0.1:{bridge_port}", redis_token)
    )
    from shared.local.demo import DemoSite, allow_demo_origins
    from shared.local.queue import run_subscribers_in_thread, start_queue_server

    queue_process, queue_environment = start_queue_server()
    os.environ.update(queue_environment)
    from shared.local.routes import LocalRouter
    from shared.settings import get_settings

    get_settings.cache_clear()
    refused_port = _free_port() if _port_open("127.0.0.1", args.port + 1) else args.port + 1
    allow_demo_origins(server.url(DATABASE), DEMO_WIDGET_KEY, args.port)
    site = DemoSite(api_port=args.port, widget_key=DEMO_WIDGET_KEY, allowed=True, refused_port=refused_port)
    _serve_in_thread(LocalRouter(site), args.port)
    _serve_in_thread(DemoSite(api_port=args.port, widget_key=DEMO_WIDGET_KEY, allowed=False), refused_port)
    run_subscribers_in_thread()

    import jwt

    now = int(time.time())
    token = jwt.encode(
        {
            "sub": DEMO_USER["id"],
            "email": DEMO_USER["email"],
            "aud": "authenticated",
            "role": "authenticated",
            "iat": now,
            "exp": now + 12 * 3600,
        },
        os.environ["SUPABASE_JWT_SECRET"],
        algorithm="HS256",
    )
    base = f"http://127.0.0.1:{args.port}"
    print(f"HiredHands local stack serving at {base}", flush=True)
    print(
        f"  demo site with the widget: http://localhost:{args.port}/ (refused origin: http://localhost:{refused_port}/)"
    )
    print(f"  database (as the API login role): {server.url(DATABASE, user='authenticator')}")
    print(f"  redis: {redis_url} behind the Upstash REST bridge at http://127.0.0.1:{bridge_port}")
    print(f"  queue: the vercel-queue dev server at {queue_environment['VERCEL_QUEUE_BASE_URL']}")
    print(f"  demo user: {DEMO_USER['email']} ({DEMO_USER['id']})")
    print(f"  demo access token (12 h): {token}")
    print(f"  demo widget key: {DEMO_WIDGET_KEY}")
    schedules = ", ".join(f"{c.path} ({c.schedule})" for c in crons())
    print(f"  crons: {schedules}, called with a fresh CRON_SECRET; each run prints a 'cron' line here")
    print(f"  watch a scan: curl -s {base}/api/scans/<id> -H 'authorization: Bearer <token>'")
    print(f"  try: curl -s {base}/api/health/ready")
    print(
        f"  try: curl -s -X POST {base}/api/widget/{DEMO_WIDGET_KEY}/chat -H 'content-type: application/json'"
        " -H 'origin: http://localhost:3000' -d '{\"message\": \"When are you open?\"}'",
        flush=True,
    )
    stop = threading.Event()
    start_scheduler(base, os.environ["CRON_SECRET"], stop)
    try:
        _wait_forever()
    finally:
        stop.set()
        queue_process.terminate()
        if redis_process is not None:
            redis_process.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hiredhands", description="HiredHands local tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("db", help="start the local database and print DATABASE_URL").set_defaults(func=cmd_db)
    dev = sub.add_parser("dev", help="start the whole local stack")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
