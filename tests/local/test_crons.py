"""The local scheduler: vercel.json's crons, called on their schedules with the secret, as Vercel Cron does."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from shared.local.crons import crons, run_due, schedule_matches
from shared.local.routes import LocalRouter
from shared.settings import get_settings

SECRET = "local-cron-secret-0123456789abcdef"
FRIDAY_10_15 = dt.datetime(2026, 12, 4, 10, 15, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("schedule", "due"),
    [
        ("* * * * *", True),
        ("*/5 * * * *", True),
        ("*/7 * * * *", False),
        ("15 10 * * *", True),
        ("0 10 * * *", False),
        ("10-20/5 10 4 12 5", True),
        ("0,15,30 * * * 1-4", False),
        ("15 10 * * 0,5", True),
    ],
)
def test_schedule_matches_like_cron(schedule: str, due: bool) -> None:
    assert schedule_matches(schedule, FRIDAY_10_15) is due


@pytest.fixture
def local_stack(monkeypatch: pytest.MonkeyPatch, worker_db: str) -> Iterator[str]:
    """Every function on one port, as ``hiredhands dev`` serves them, with a CRON_SECRET."""
    monkeypatch.setenv("CRON_SECRET", SECRET)
    get_settings.cache_clear()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(LocalRouter(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    get_settings.cache_clear()


def test_every_due_cron_runs_through_its_function_with_the_secret(local_stack: str) -> None:
    lines: list[str] = []
    called = run_due(local_stack, SECRET, FRIDAY_10_15, report=lines.append)
    assert called == [c.path for c in crons() if schedule_matches(c.schedule, FRIDAY_10_15)]
    assert {"/api/cron/scans", "/api/cron/deliveries"} <= set(called)
    assert all(" -> 200 {" in line for line in lines), lines


def test_without_the_secret_the_functions_refuse(local_stack: str) -> None:
    lines: list[str] = []
    run_due(local_stack, "not-the-secret", FRIDAY_10_15, report=lines.append)
    assert lines
    assert all(" -> 401 " in line for line in lines), lines
