"""Streamed widget replies through the deployment as built: the widget function, assembled from only
what it ships and started through Vercel's own Python entry, with a loopback model that writes one
word every ``INTERVAL`` seconds. The events must leave as they are written, not when the reply is
done, and the build output must tell Vercel's platform that the function streams.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from shared.local.build_output import BuiltFunction, Routes, ServedFunction, output_config, serve
from shared.local.cli import DEMO_WIDGET_KEY
from tests.fakes.openai_server import FakeOpenAI, running_fake_openai

WIDGET = "functions/external/widget_chat.py"
ORIGIN = "http://localhost:3000"
WORDS = 12
INTERVAL = 0.25


@pytest.fixture(scope="module")
def paced_model() -> Iterator[FakeOpenAI]:
    with running_fake_openai() as fake:
        fake.reply.content = " ".join(f"word{i}" for i in range(WORDS))
        fake.token_interval_seconds = INTERVAL
        yield fake


@pytest.fixture(scope="module")
def streaming_widget(
    built: dict[str, BuiltFunction], function_env: dict[str, str], paced_model: FakeOpenAI
) -> Iterator[ServedFunction]:
    env = {**function_env, "OPENAI_API_KEY": paced_model.api_key, "OPENAI_BASE_URL": paced_model.base_url}
    with serve(built[WIDGET], env, instance=".streaming") as served:
        yield served


def test_the_widget_function_is_built_to_stream(built: dict[str, BuiltFunction]) -> None:
    assert built[WIDGET].config.get("supportsResponseStreaming") is True


def test_events_leave_vercels_entry_as_they_are_written(streaming_widget: ServedFunction) -> None:
    routed = Routes(output_config()).resolve(f"/api/widget/{DEMO_WIDGET_KEY}/chat")
    assert routed is not None
    assert routed.function == WIDGET

    arrivals: list[tuple[str, float, dict[str, object]]] = []
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        streaming_widget.base_url + routed.target,
        json={"message": "When are you open?"},
        headers={"origin": ORIGIN, "accept": "text/event-stream"},
        timeout=30,
    ) as response:
        assert response.status_code == 200, (response.read(), streaming_widget.logs()[-20:])
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                arrivals.append((name, time.perf_counter() - started, json.loads(line.removeprefix("data: "))))

    names = [name for name, _, _ in arrivals]
    assert names == ["conversation", *["delta"] * WORDS, "done"], names
    first_delta = next(at for name, at, _ in arrivals if name == "delta")
    done = arrivals[-1][1]
    # The model takes (WORDS - 1) * INTERVAL = 2.75 s from its first word to its last; a buffered
    # response would deliver every event together at the end.
    assert done - first_delta > (WORDS - 2) * INTERVAL, f"first delta at {first_delta:.2f} s, done at {done:.2f} s"
    assert "".join(str(data["text"]) for name, _, data in arrivals if name == "delta").split() == [
        f"word{i}" for i in range(WORDS)
    ]
