"""Test harness: the real embedded Postgres and the real Redis, nothing faked on our side.

One server per machine, one template database per schema version (bootstrap + migrations, built
once under a file lock), one database per xdist worker cloned from it, and one rolled-back
transaction per test. Tests that need real commits or racing connections use ``committed_db``
(the real pool) with fresh tenants from the factories.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from upstash_redis.asyncio import Redis

# Configuration for the code under test, set before anything reads settings.
os.environ.update(
    {
        "ENVIRONMENT": "test",
        "SUPABASE_JWT_SECRET": "test-jwt-secret-0123456789abcdef0123456789abcdef",
        "WIDGET_TOKEN_SECRET": "test-widget-token-secret-0123456789abcdef",
        "CREDENTIAL_KEYS": "k1:" + base64.b64encode(hashlib.sha256(b"test credential key").digest()).decode(),
    }
)
for _name in ("OPENAI_API_KEY", "STRIPE_SECRET_KEY", "SUPABASE_JWKS_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_name, None)

from shared.db.adapters import register_adapters  # noqa: E402
from shared.db.pool import close_pools  # noqa: E402
from shared.local.database import (  # noqa: E402
    LocalServer,
    apply_schema,
    create_database,
    schema_fingerprint,
    start_server,
)
from shared.local.redis_bridge import start_bridge  # noqa: E402
from shared.logs import JsonFormatter, get_logger  # noqa: E402
from shared.redis import make_redis  # noqa: E402
from shared.settings import get_settings  # noqa: E402

Connection = AsyncConnection[DictRow]
register_adapters()  # the tests' connections adapt parameters as the pool's do

ROOT = Path(__file__).resolve().parents[1]
PG_DATA = Path(tempfile.gettempdir()) / f"hiredhands-test-pg-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"


@asynccontextmanager
async def _noop() -> AsyncIterator[None]:
    yield


@pytest.fixture(scope="session")
def pg_server() -> LocalServer:
    return start_server(PG_DATA)


@contextmanager
def cluster_lock() -> Iterator[None]:
    """One process at a time on the server's shared catalogs: the bootstrap alters roles, which
    every database shares, and two concurrent bootstraps fail with "tuple concurrently updated"."""
    with open(PG_DATA.parent / f"{PG_DATA.name}.template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def template_db(pg_server: LocalServer) -> str:
    name = f"hh_tpl_{schema_fingerprint()}"
    with cluster_lock():
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            building = name + "_building"
            create_database(pg_server, building, replace=True)
            apply_schema(pg_server.url(building), seed=False)
            with psycopg.connect(pg_server.url(), autocommit=True) as conn:
                conn.execute(f'alter database "{building}" rename to "{name}"')
    return name


@pytest.fixture(scope="session")
def worker_db(pg_server: LocalServer, template_db: str, worker_id: str) -> Iterator[str]:
    # The process id keeps concurrent test runs on one machine out of each other's databases.
    name = f"hh_test_{worker_id}_{os.getpid()}"
    create_database(pg_server, name, template=template_db, replace=True)
    os.environ["DATABASE_URL"] = pg_server.url(name, user="authenticator")
    get_settings.cache_clear()
    yield name
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def admin_url(pg_server: LocalServer, worker_db: str) -> str:
    """Superuser URL for factories and assertions; the code under test never gets it."""
    return pg_server.url(worker_db)


@pytest.fixture(scope="session")
def app_url(pg_server: LocalServer, worker_db: str) -> str:
    return pg_server.url(worker_db, user="authenticator")


@pytest.fixture
async def db(admin_url: str) -> AsyncIterator[Connection]:
    """One connection in one transaction, rolled back after the test.

    It logs in as the superuser (factories need it) and then drops to ``authenticator``, the
    production login role, so code under test that forgets to choose a role gets 42501.
    """
    conn = await AsyncConnection.connect(admin_url, row_factory=dict_row, prepare_threshold=None)
    try:
        await conn.execute("set local role authenticator")
        yield conn
    finally:
        await conn.rollback()
        await conn.close()


@dataclass
class _Turn:
    """Who is using a test connection: tasks of the code under test take turns, like pool checkouts."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    owner: asyncio.Task[Any] | None = None
    depth: int = 0


_turns: weakref.WeakKeyDictionary[Connection, _Turn] = weakref.WeakKeyDictionary()


class TransactionDatabase:
    """The app's Database, pinned to the test's transaction: code under test opens savepoints.

    Production gives concurrent tasks of one request their own pooled connections; here they share
    one, so a task waits for the connection while another uses it (a task may nest its own uses).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        turn = _turns.setdefault(self.conn, _Turn())
        task = asyncio.current_task()
        if turn.owner is not task:
            await turn.lock.acquire()
            turn.owner = task
        turn.depth += 1
        try:
            yield self.conn
        finally:
            turn.depth -= 1
            if turn.depth == 0:
                turn.owner = None
                turn.lock.release()


@pytest.fixture
async def committed_db(worker_db: str) -> AsyncIterator[None]:
    """The real pool on the worker database; data committed here must use fresh tenants."""
    yield
    await close_pools()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every log line the code under test writes, exactly as formatted for production."""
    collector = _Collect()
    logger = get_logger()
    logger.addHandler(collector)
    try:
        yield collector.lines
    finally:
        logger.removeHandler(collector)


REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session", autouse=True)
def redis_bridge() -> Iterator[tuple[str, str]]:
    """The Upstash REST bridge in front of the real Redis, configured for every test's code.

    Yields ``(url, token)``: what UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN are in production.
    """
    running = start_bridge(REDIS_URL, secrets.token_urlsafe(24))
    os.environ["UPSTASH_REDIS_REST_URL"] = running.url
    os.environ["UPSTASH_REDIS_REST_TOKEN"] = running.token
    get_settings.cache_clear()
    try:
        yield running.url, running.token
    finally:
        running.stop()


@pytest.fixture
def direct_redis() -> Iterator[redis.Redis]:
    """A plain TCP client to the same Redis, to look behind the bridge."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        client.close()


def forget_keys(direct_redis: redis.Redis, *patterns: str) -> None:
    """Delete every key matching any of ``patterns`` (a test's rate-limit counters, say)."""
    keys = [key for pattern in patterns for key in direct_redis.scan_iter(match=pattern, count=1000)]
    if keys:
        direct_redis.delete(*keys)


def counted_hits(direct_redis: redis.Redis, pattern: str) -> int:
    """The hits a rate limit holds in the counters matching ``pattern``, all windows together."""
    return sum(int(direct_redis.get(key) or 0) for key in direct_redis.scan_iter(match=pattern, count=1000))


@pytest.fixture
def key_prefix(direct_redis: redis.Redis) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    forget_keys(direct_redis, f"{prefix}*")


@pytest.fixture
async def upstash(redis_bridge: tuple[str, str]) -> AsyncIterator[Redis]:
    url, token = redis_bridge
    client = make_redis(url, token)
    try:
        yield client
    finally:
        await client.close()


@contextmanager
def counting_requests(client: Redis) -> Iterator[list[str]]:
    """The paths of the HTTP requests ``client`` sends to the Upstash REST API meanwhile, counted by
    the client's own httpx hook (what goes on the wire; nothing is replaced)."""
    paths: list[str] = []
    http = client._http._client

    async def record(request: httpx.Request) -> None:
        paths.append(request.url.path)

    http.event_hooks["request"].append(record)
    try:
        yield paths
    finally:
        http.event_hooks["request"].remove(record)


_GENERATED_IDS = re.compile(r"req_[0-9a-f]+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def without_generated_ids(text: str) -> str:
    """``text`` with request ids and UUIDs masked: random hex that may contain "4242" by chance,
    which a search for a card's last four digits must not mistake for an echo of the card."""
    return _GENERATED_IDS.sub("<id>", text)


def waits_for_the_server(trace: str) -> int:
    """Round trips in a libpq trace: the client waits for the server after each Sync (extended
    protocol), Flush (a result fetched in pipeline mode) or Query (simple protocol). A Flush right
    after a Sync is the same wait (psycopg sends both when a pipeline ends)."""
    sent = [line.split("\t")[2].split(" ")[0] for line in trace.splitlines() if line.startswith("F")]
    return sum(
        1
        for i, message in enumerate(sent)
        if message in {"Sync", "Query"} or (message == "Flush" and (i == 0 or sent[i - 1] != "Sync"))
    )
