"""The widget in a real browser: Debian's Chromium driven by Playwright, against the local stack.

One Chromium per test session (each test gets a fresh context: its own storage, viewport and
console). The API, ``widget.js`` and the demo site are served by the same ``LocalRouter`` and
``DemoSite`` as ``hiredhands dev``, over the real Postgres and Redis; the model is the loopback
OpenAI-compatible server. The site is at ``http://localhost:<port>/`` and loads the widget from
``http://127.0.0.1:<port>``, so every API request is cross-origin, as on a customer's site.

Without ``/usr/bin/chromium`` (``scripts/test`` installs it where it runs as root with apt-get)
every test here is skipped, with the reason in the summary.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql
import pytest
import redis
import uvicorn
from playwright.async_api import expect
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from starlette.types import ASGIApp, Receive, Scope, Send

from shared.db.pool import close_pools
from shared.gateway import close_clients
from shared.local.demo import DemoSite, demo_origins
from shared.local.routes import LocalRouter
from shared.redis import close_redis
from shared.settings import get_settings
from tests.conftest import forget_keys
from tests.factories import create_agent, create_org
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "test-artifacts" / "widget"
CHROMIUM = "/usr/bin/chromium"
# The flags Chromium needs headless, as root, on a machine with no route to the internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# A reply takes a model call and several database round trips on a machine shared with the other
# tests; the first one also imports the model SDK. Waits are for outcomes, so a longer bound costs
# nothing when things are fast.
expect.set_options(timeout=20_000)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(
            f"browser tests need Debian's chromium at {CHROMIUM}: run scripts/test as root on Debian "
            "(it installs the package), or 'apt-get install chromium'"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ClosingClients:
    """``app``, and on the server's shutdown the database pool and clients its loop opened, so no
    connection outlives the module's tests."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await close_clients()
                await close_redis()
                await close_pools()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _serve(app: ASGIApp) -> tuple[int, uvicorn.Server, threading.Thread]:
    sock = _listening_socket()
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(ClosingClients(app), lifespan="on", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"site-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the local site did not start")
        time.sleep(0.01)
    return port, server, thread


@dataclass
class Stack:
    port: int
    """The API, widget.js and the allowed site (on the other loopback name)."""
    refused_port: int
    """A site in no agent's allowed origins."""
    site: DemoSite
    refused_site: DemoSite
    fake: FakeOpenAI
    admin_url: str

    @property
    def site_url(self) -> str:
        return f"http://localhost:{self.port}/"

    @property
    def refused_url(self) -> str:
        return f"http://localhost:{self.refused_port}/"

    @property
    def chat_url_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^http://127\.0\.0\.1:{self.port}/api/widget/[^/]+/chat$")

    def show(self, key: str) -> None:
        """Put the widget with ``key`` on both sites."""
        self.site.widget_key = key
        self.refused_site.widget_key = key

    def set_limits(self, org_id: uuid.UUID, **limits: int) -> None:
        """Change the organization's limits (``organization_limits`` columns), committed."""
        assignments = psycopg.sql.SQL(", ").join(
            psycopg.sql.SQL("{} = {}").format(psycopg.sql.Identifier(name), value) for name, value in limits.items()
        )
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(
                psycopg.sql.SQL("update public.organization_limits set {} where org_id = {}").format(
                    assignments, org_id
                )
            )

    def sql(self, query: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cursor = conn.execute(query, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(scope="module")
async def stack(worker_db: str, admin_url: str, redis_bridge: tuple[str, str]) -> AsyncIterator[Stack]:
    with running_fake_openai() as fake, pytest.MonkeyPatch.context() as env:
        env.setenv("OPENAI_API_KEY", fake.api_key)
        env.setenv("OPENAI_BASE_URL", fake.base_url)
        env.setenv("MODEL_TIMEOUT_SECONDS", "10")
        get_settings.cache_clear()
        site = DemoSite(api_port=0, widget_key="", allowed=True)
        refused_site = DemoSite(api_port=0, widget_key="", allowed=False)
        port, server, thread = _serve(LocalRouter(site))
        refused_port, refused_server, refused_thread = _serve(refused_site)
        site.api_port = refused_site.api_port = port
        site.refused_port = refused_port
        try:
            yield Stack(port, refused_port, site, refused_site, fake, admin_url)
        finally:
            for running, running_thread in ((server, thread), (refused_server, refused_thread)):
                running.should_exit = True
                running_thread.join(10)
    get_settings.cache_clear()


@dataclass
class Widget:
    key: str
    org_id: uuid.UUID
    agent_id: uuid.UUID
    display_name: str
    greeting: str


@pytest.fixture
async def widget(stack: Stack, direct_redis: redis.Redis) -> AsyncIterator[Widget]:
    """A fresh organization and agent whose widget allows the test site, shown on both sites."""
    key = "hh_wk_" + secrets.token_hex(24)
    display_name = f"Harbour Books {secrets.token_hex(3)}"
    greeting = f"Ahoy from {display_name}! Ask me anything."
    conn = await AsyncConnection.connect(stack.admin_url, row_factory=dict_row, autocommit=True)
    try:
        org = await create_org(conn)
        agent = await create_agent(
            conn,
            org,
            widget_key=key,
            display_name=display_name,
            greeting=greeting,
            allowed_origins=demo_origins(stack.port),
            theme={"accent": "#0a7"},
        )
    finally:
        await conn.close()
    stack.fake.reset()
    stack.show(key)
    yield Widget(key, org["id"], agent["id"], display_name, greeting)
    forget_keys(direct_redis, f"hh:rl:*:{agent['id']}*", f"hh:rl:*:{org['id']}*")


INIT_SCRIPT = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective));
"""


@dataclass
class Observed:
    """What a page did that a test may assert on: console lines, errors, dialogs, requests."""

    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture
async def open_page(browser: Any, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """``await open_page(**context_options)``: a page in a fresh context, observed; its last state
    is saved as ``build/test-artifacts/widget/<test>.png`` (``await page.snap(label)`` saves a moment
    as ``<test>-<label>.png``), and it must end with no CSP violation or uncaught error."""
    contexts: list[Any] = []
    pages: list[Any] = []

    async def open_(**options: Any) -> Any:
        context = await browser.new_context(**options)
        contexts.append(context)
        await context.add_init_script(INIT_SCRIPT)
        page = await context.new_page()
        observed = Observed()
        page.observed = observed
        page.on("console", lambda message: observed.console.append(message.text))
        page.on("pageerror", lambda error: observed.errors.append(str(error)))
        page.on("request", lambda req: observed.requests.append(req.url))

        async def on_dialog(dialog: Any) -> None:
            observed.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)

        async def snap(label: str) -> None:
            """A screenshot of the moment, beside the one of the page's last state."""
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{label}.png"))

        page.snap = snap
        pages.append(page)
        return page

    yield open_
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        for index, page in enumerate(pages):
            suffix = f"-{index}" if index else ""
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}{suffix}.png"))
            violations = await page.evaluate("window.__violations")
            assert violations == [], f"the page's Content-Security-Policy was violated: {violations}"
            assert page.observed.errors == [], f"uncaught errors in the page: {page.observed.errors}"
    finally:
        for context in contexts:
            await context.close()
