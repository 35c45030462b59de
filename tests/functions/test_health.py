"""Health endpoints: liveness needs nothing; readiness names each dependency and never hangs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest

from functions.health import app
from shared.db.pool import close_pools
from shared.redis import close_redis
from shared.settings import get_settings
from tests.factories import closed_port


@pytest.fixture
async def client(worker_db: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    # Fresh pools and clients for whatever runs next, with the settings restored by monkeypatch.
    await close_pools()
    await close_redis()


@pytest.fixture
def database_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://authenticator@127.0.0.1:{closed_port()}/hiredhands")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def redis_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("UPSTASH_REDIS_REST_URL", f"http://127.0.0.1:{closed_port()}")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class TestLiveness:
    async def test_live_needs_no_dependency(self, client: httpx.AsyncClient, database_down: None, redis_down: None):
        response = await client.get("/api/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


class TestReadiness:
    async def test_ready_when_both_answer(self, client: httpx.AsyncClient):
        await close_pools()
        await close_redis()
        response = await client.get("/api/health/ready")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert {name: check["status"] for name, check in body["checks"].items()} == {"database": "ok", "redis": "ok"}

    async def test_database_down_is_503_naming_the_database(self, client: httpx.AsyncClient, database_down: None):
        await close_pools()
        started = time.perf_counter()
        response = await client.get("/api/health/ready")
        elapsed = time.perf_counter() - started
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "degraded"
        assert body["checks"]["database"]["status"] == "down"
        assert body["checks"]["redis"]["status"] == "ok"
        assert elapsed < 5, f"readiness took {elapsed:.1f} s; it must answer within its check timeouts"
        for leak in ("127.0.0.1", "authenticator", "Traceback", "psycopg"):
            assert leak not in response.text

    async def test_redis_down_is_503_naming_redis(self, client: httpx.AsyncClient, redis_down: None):
        await close_redis()
        response = await client.get("/api/health/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["checks"]["redis"]["status"] == "down"
        assert body["checks"]["database"]["status"] == "ok"
        assert "127.0.0.1" not in response.text


class TestSecurityTxt:
    def test_security_txt_follows_rfc_9116(self) -> None:
        from shared.local.routes import static_files

        files = static_files()
        text = files["/.well-known/security.txt"].read_text()
        fields = dict(line.split(": ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        assert fields["Contact"] == "mailto:security@hiredhands.dev"
        expires = datetime.fromisoformat(fields["Expires"].replace("Z", "+00:00"))
        assert expires > datetime.now(UTC), "security.txt has expired (RFC 9116): set a new Expires date"
