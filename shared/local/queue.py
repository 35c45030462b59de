"""Vercel Queues on a laptop: the SDK's queue dev server, and the subscribers consuming from it.

``hiredhands dev`` starts ``python -m vercel.queue.devserver`` (the SDK's HTTP emulation of the
queue service), points the SDK at it through its own environment variables, and runs every
subscriber function declared in pyproject.toml with the SDK's polling consumer (``poll_and_handle``):
the same send, lease, acknowledge and retry calls as on Vercel, where the platform pushes instead.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

# The SDK's marker for a local broker: no deployment to pin messages to (vercel.queue config).
DEV_TOKEN = "vc-dev-token"  # noqa: S105 - a fixed public marker, not a secret


def subscriber_modules() -> list[str]:
    """The modules pyproject.toml declares as subscribers (``[[tool.vercel.subscribers]]``)."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    return [str(entry["entrypoint"]) for entry in pyproject["tool"]["vercel"]["subscribers"]]


def start_queue_server() -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The dev server on a free loopback port, and the environment that points the SDK at it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vercel.queue.devserver", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None  # noqa: S101 - piped above
    line = process.stdout.readline()
    if not line:
        process.terminate()
        sys.exit("The queue dev server did not start; is vercel-queue[devserver] installed?")
    base_url = json.loads(line)["baseUrl"]
    return process, {"VERCEL_QUEUE_BASE_URL": base_url, "VERCEL_QUEUE_TOKEN": DEV_TOKEN, "VERCEL_REGION": "iad1"}


def run_subscribers_in_thread(interval_seconds: float = 0.2) -> None:
    """Every subscriber polling the dev server, on an event loop of its own."""
    from vercel.queue import get_subscriptions, poll_and_handle

    for module in subscriber_modules():
        importlib.import_module(module)
    subscribers: list[Any] = [subscription.func for subscription in get_subscriptions()]

    async def consume() -> None:
        await asyncio.gather(*(poll_and_handle(func, interval=interval_seconds) for func in subscribers))

    threading.Thread(target=asyncio.run, args=(consume(),), name="queue-subscribers", daemon=True).start()
