"""Every route, poked with bad input from an anonymous browser: never a 500, never a secret.

Routes come from vercel.json, so a function added later is covered without anyone remembering.
Every configured secret (settings' SecretStr values, including the database URL) is searched for
in every response body, every header and every log line.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from shared.db.pool import close_pools
from shared.local.routes import rewrites
from shared.settings import get_settings

FORGED_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4Iiwicm9sZSI6InNlcnZpY2Vfcm9sZSJ9.c2lnbmF0dXJl"
BODIES: list[dict[str, Any]] = [
    {},
    {"content": b"{not json", "headers": {"content-type": "application/json"}},
    {"json": {"org_id": "not-a-uuid", "message": "x" * 20_000, "extra": True}},
    {"json": [1, 2, 3]},
    {"content": b"\xff\xfe\x00", "headers": {"content-type": "application/octet-stream"}},
]


def _secrets() -> list[str]:
    settings = get_settings()
    values = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr) and len(value.get_secret_value()) >= 8:
            values.append(value.get_secret_value())
    # Parts of composite secrets too: each credential key, each webhook secret.
    return values + [part for v in values for part in re.split(r"[,:]", v) if len(part) >= 16]


def _paths() -> list[tuple[str, str]]:
    return [(r.function, re.sub(r":\w+\*?", "00000000-0000-4000-8000-000000000000", r.source)) for r in rewrites()]


@pytest.fixture
async def apps(worker_db: str) -> AsyncIterator[dict[str, Any]]:
    yield {name: importlib.import_module(f"functions.{name}").app for name, _ in _paths()}
    await close_pools()


@pytest.mark.parametrize(("function", "path"), _paths(), ids=[p for _, p in _paths()])
async def test_bad_requests_get_a_clear_4xx_and_reveal_no_secret(
    apps: dict[str, Any], function: str, path: str, log_lines: list[str]
) -> None:
    transport = httpx.ASGITransport(app=apps[function], raise_app_exceptions=False)
    seen: list[str] = []
    async with httpx.AsyncClient(transport=transport, base_url="https://api.hiredhands.test") as client:
        for auth in ({}, {"authorization": f"Bearer {FORGED_TOKEN}"}):
            responses = [await client.get(path, headers=auth), await client.delete(path, headers=auth)]
            for body in BODIES:
                headers = {**auth, **body.get("headers", {})}
                kwargs = {k: v for k, v in body.items() if k != "headers"}
                responses.append(await client.post(path, headers=headers, **kwargs))
            for response in responses:
                assert response.status_code < 500, f"{response.request.method} {path}: {response.text}"
                seen.append(response.text)
                seen.extend(f"{k}: {v}" for k, v in response.headers.items())
                if response.status_code >= 400:
                    assert response.headers["content-type"] == "application/problem+json", response.text
    everything = "\n".join(seen + log_lines)
    secrets = _secrets()
    assert len(secrets) >= 4, "the test environment configures the JWT, widget, credential and Redis secrets"
    for secret in secrets:
        assert secret not in everything, "a configured secret reached a response or a log line"
    assert "Traceback" not in everything
