"""``EventStreamResponse`` at its ASGI boundary: what it sends, and that its source always settles."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from shared.web.sse import KEEP_ALIVE, EventStreamResponse, event


class Source:
    """An event source that records how far it got and whether it was closed."""

    def __init__(self, events: list[bytes], *, pause: float = 0.0, pause_after: int = 0) -> None:
        self._events = events
        self._pause = pause
        self._pause_after = pause_after
        self.sent = 0
        self.cancelled = False
        self.closed = 0

    async def events(self) -> AsyncIterator[bytes]:
        try:
            for index, chunk in enumerate(self._events):
                if index == self._pause_after and self._pause:
                    await asyncio.sleep(self._pause)
                self.sent += 1
                yield chunk
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def close(self) -> None:
        await asyncio.sleep(0.01)  # settling takes a round trip or two
        self.closed += 1


async def run(
    source: Source, *, disconnect_after: float | None = None, keep_alive: float = 15.0
) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await asyncio.Event().wait()  # the client never leaves
        await asyncio.sleep(disconnect_after or 0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    response = EventStreamResponse(source, {"X-Test": "1"}, keep_alive_seconds=keep_alive)
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    return sent


def body(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_an_event_is_its_name_and_one_line_of_json() -> None:
    encoded = event("delta", {"text": "two\nlines and </script> and é"})
    name, data, end = encoded.split(b"\n", 2)
    assert name == b"event: delta"
    assert json.loads(data.removeprefix(b"data: ")) == {"text": "two\nlines and </script> and é"}
    assert end == b"\n"


async def test_events_are_sent_in_order_then_the_end_and_the_source_is_closed_once() -> None:
    source = Source([event("a", {}), event("b", {})])

    sent = await run(source)

    start = sent[0]
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"x-accel-buffering"] == b"no"
    assert b"content-length" not in headers
    assert body(sent) == event("a", {}) + event("b", {})
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert source.closed == 1


async def test_a_quiet_stream_gets_keep_alive_comments() -> None:
    source = Source([event("a", {}), event("b", {})], pause=0.35, pause_after=1)

    sent = await run(source, keep_alive=0.1)

    assert body(sent).count(KEEP_ALIVE) >= 2
    assert body(sent).startswith(event("a", {}) + KEEP_ALIVE)


async def test_a_client_that_leaves_stops_the_source_which_still_settles_before_the_response_ends() -> None:
    source = Source([event("a", {}), event("b", {})], pause=5.0, pause_after=1)

    sent = await run(source, disconnect_after=0.1)

    assert source.sent == 1
    assert source.cancelled, "the source was stopped, not left running"
    assert source.closed == 1, "and it settled before the response returned"
    assert not any(m.get("more_body") is False for m in sent), "no end is sent to a client that left"


async def test_a_client_that_left_before_anything_was_read_still_settles_the_source() -> None:
    source = Source([event("a", {})], pause=5.0, pause_after=0)

    await run(source, disconnect_after=0)

    assert (source.sent, source.closed) == (0, 1)
