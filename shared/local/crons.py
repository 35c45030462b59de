"""Vercel Cron, locally: ``hiredhands dev`` calls each vercel.json cron path on its schedule with
``Authorization: Bearer <CRON_SECRET>``, as the scheduler does, so queued scans progress and
deliveries go out with no extra step. Each run prints one line: the path, the status and the counts.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from shared.local.routes import load_config


def _field_matches(spec: str, value: int, low: int) -> bool:
    for part in spec.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = low, value if step == 1 else 10**6
        elif "-" in base:
            first, last = base.split("-")
            start, end = int(first), int(last)
        else:
            start = int(base)
            end = start if not step_text else 10**6
        if start <= value <= end and (value - start) % step == 0:
            return True
    return False


def schedule_matches(schedule: str, at: dt.datetime) -> bool:
    """Standard five-field cron (minute hour day month weekday), UTC, as Vercel Cron reads it."""
    minute, hour, day, month, weekday = schedule.split()
    return (
        _field_matches(minute, at.minute, 0)
        and _field_matches(hour, at.hour, 0)
        and _field_matches(day, at.day, 1)
        and _field_matches(month, at.month, 1)
        and _field_matches(weekday, at.isoweekday() % 7, 0)
    )


@dataclass(frozen=True)
class Cron:
    path: str
    schedule: str


def crons() -> list[Cron]:
    return [Cron(path=c["path"], schedule=c["schedule"]) for c in load_config().get("crons", [])]


def run_due(base_url: str, secret: str, at: dt.datetime, report: Callable[[str], None] = print) -> list[str]:
    """Calls every cron due at ``at``; returns the paths called."""
    called = []
    for cron in crons():
        if not schedule_matches(cron.schedule, at):
            continue
        called.append(cron.path)
        try:
            response = httpx.get(base_url + cron.path, headers={"authorization": f"Bearer {secret}"}, timeout=120)
            body = json.dumps(response.json()) if response.content else ""
            report(f"cron {at:%H:%M} {cron.path} -> {response.status_code} {body}")
        except (httpx.HTTPError, ValueError) as exc:
            report(f"cron {at:%H:%M} {cron.path} -> failed: {exc!r}")
    return called


def start_scheduler(base_url: str, secret: str, stop: threading.Event) -> threading.Thread:
    """Runs the due crons at the start of every UTC minute until ``stop`` is set."""

    def loop() -> None:
        while True:
            now = dt.datetime.now(dt.UTC)
            next_minute = now.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
            if stop.wait((next_minute - now).total_seconds()):
                return
            run_due(base_url, secret, next_minute)

    thread = threading.Thread(target=loop, name="local-cron", daemon=True)
    thread.start()
    return thread
