"""Serving the build output (``.vercel/output``) through Vercel's own Python entry, against the
local stack: the real Postgres (a database seeded like ``hiredhands dev``) and Redis behind the
Upstash REST bridge.

``deployment`` sends a request the way Vercel's edge would: ``config.json``'s routes pick the
function, which gets the path that was asked for. ``serve_built`` starts one function (once per
module) and returns it, with its ``base_url``, for tests that need to talk to it directly (a
streaming response, say).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import psycopg
import pytest

from shared.local.build_output import (
    OUTPUT,
    BuiltFunction,
    Routes,
    ServedFunction,
    built_functions,
    output_config,
    serve,
)
from shared.local.database import SEED, LocalServer, create_database
from tests.factories import closed_port
from tests.fakes.stripe_api import SECRET_KEY, WEBHOOK_SECRET

CRON_SECRET = secrets.token_urlsafe(32)


def _require_build() -> None:
    if not (OUTPUT / "config.json").exists():
        message = (
            f"NO BUILD OUTPUT at {OUTPUT}: the built functions were not tested. "
            "Run scripts/build first (scripts/test does)."
        )
        if os.environ.get("HIREDHANDS_REQUIRE_BUILD"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def built() -> dict[str, BuiltFunction]:
    _require_build()
    return {function.name: function for function in built_functions()}


@pytest.fixture(scope="session")
def smoke_db(pg_server: LocalServer, template_db: str) -> Iterator[str]:
    """A committed database with the local seed (demo user, organization, agent and widget key)."""
    name = f"hh_smoke_{os.getpid()}"
    create_database(pg_server, name, template=template_db, replace=True)
    # The template already holds the bootstrap and every migration: only the seed is added (a second
    # bootstrap would alter the cluster's roles while other workers do).
    with psycopg.connect(pg_server.url(name), autocommit=True) as conn, conn.transaction():
        conn.execute(SEED.read_text())
    yield name
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def function_env(pg_server: LocalServer, smoke_db: str, redis_bridge: tuple[str, str]) -> dict[str, str]:
    """What the project's settings would hold on Vercel, pointed at the local stack."""
    url, token = redis_bridge
    return {
        "ENVIRONMENT": "test",
        "DATABASE_URL": pg_server.url(smoke_db, user="authenticator"),
        "UPSTASH_REDIS_REST_URL": url,
        "UPSTASH_REDIS_REST_TOKEN": token,
        "SUPABASE_JWT_SECRET": os.environ["SUPABASE_JWT_SECRET"],
        "WIDGET_TOKEN_SECRET": os.environ["WIDGET_TOKEN_SECRET"],
        "CREDENTIAL_KEYS": os.environ["CREDENTIAL_KEYS"],
        "CRON_SECRET": CRON_SECRET,
        "STRIPE_SECRET_KEY": SECRET_KEY,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        # Stripe's API is down here: the smoke test needs no call to it.
        "STRIPE_API_BASE": f"http://127.0.0.1:{closed_port()}",
    }


ServeBuilt = Callable[[str], ServedFunction]


@pytest.fixture(scope="module")
def serve_built(built: dict[str, BuiltFunction], function_env: dict[str, str]) -> Iterator[ServeBuilt]:
    """``serve_built("functions/external/widget_chat.py").base_url``: the function, started once per module."""
    running: dict[str, ServedFunction] = {}
    with ExitStack() as stack:

        def start(name: str) -> ServedFunction:
            if name not in running:
                running[name] = stack.enter_context(serve(built[name], function_env))
            return running[name]

        yield start


class Deployment:
    """Requests routed as Vercel routes them, to functions served from the build output."""

    def __init__(self, serve_built: ServeBuilt, routes: Routes) -> None:
        self._serve = serve_built
        self._routes = routes

    def function_for(self, path: str) -> str:
        routed = self._routes.resolve(path)
        assert routed is not None, f"no route in config.json reaches {path}"
        return routed.function

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        path, _, query = url.partition("?")
        routed = self._routes.resolve(path, query)
        assert routed is not None, f"no route in config.json reaches {path}"
        served = self._serve(routed.function)
        response = httpx.request(method, served.base_url + routed.target, timeout=30, **kwargs)
        if response.status_code >= 500 and response.status_code != 503:  # 503: not ready, said as such
            log = "\n".join(served.logs()[-30:])
            pytest.fail(f"{method} {url} -> {response.status_code} {response.text}\n{routed.function} said:\n{log}")
        return response


@pytest.fixture(scope="module")
def deployment(serve_built: ServeBuilt) -> Deployment:
    return Deployment(serve_built, Routes(output_config()))
