"""Server-Sent Events: the wire format, and a response whose producer always gets to finish its books.

``EventStreamResponse`` sends what an ``EventSource`` produces, and differs from Starlette's
``StreamingResponse`` in what happens when the client goes away. Starlette cancels the producer
wherever it is (or, under newer servers, leaves it unclosed), so work that must happen after the
last event (metering a model call, storing a transcript) could be cut in half. Here:

* the producer runs in a task of its own and its events go through a queue, so a wait for the next
  event never blocks the disconnect watch or the keep-alive comments;
* when the client disconnects, the producer is cancelled once (stopping, say, a model that is still
  writing) and then ``close()`` is awaited, shielded: the source settles whatever is left, and the
  response is not finished until it has;
* ``close()`` runs after every stream, ended or cut, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shared.logs import DECISION_REASON, log_event

KEEP_ALIVE = b": keep-alive\n\n"
KEEP_ALIVE_SECONDS = 15.0
"""Under the idle timeouts of common proxies and load balancers (often 30 to 60 s)."""


def event(name: str, data: Mapping[str, Any]) -> bytes:
    """One event: its name and its data as one line of JSON (JSON never contains a raw newline)."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class EventSource(Protocol):
    def events(self) -> AsyncIterator[bytes]:
        """The encoded events, in order. Called once."""
        ...

    async def close(self) -> None:
        """Called once after the stream, however it ended (also when ``events`` was never read)."""
        ...


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        source: EventSource,
        headers: Mapping[str, str] | None = None,
        *,
        keep_alive_seconds: float = KEEP_ALIVE_SECONDS,
    ) -> None:
        self.source = source
        self.keep_alive_seconds = keep_alive_seconds
        self.status_code = 200
        self.background = None
        self.init_headers({**(headers or {}), "X-Accel-Buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG002 - the ASGI signature
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the source has ended
        events = self.source.events()

        async def produce() -> None:
            try:
                async for chunk in events:
                    queue.put_nowait(chunk)
            finally:
                queue.put_nowait(None)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        producer = asyncio.ensure_future(produce())
        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._pump(queue, watcher, send, self.keep_alive_seconds)
        except OSError:
            pass  # servers on ASGI 2.4 report a client that left by failing the send
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            await asyncio.shield(self._settle(producer))

    @staticmethod
    async def _pump(
        queue: asyncio.Queue[bytes | None], watcher: asyncio.Future[None], send: Send, keep_alive_seconds: float
    ) -> None:
        """Send each event as it comes, a keep-alive comment after each quiet interval, until the
        source ends or the client leaves."""
        while True:
            getting: asyncio.Future[bytes | None] = asyncio.ensure_future(queue.get())
            waiting: set[asyncio.Future[Any]] = {getting, watcher}
            done, _ = await asyncio.wait(waiting, timeout=keep_alive_seconds, return_when=asyncio.FIRST_COMPLETED)
            if getting not in done:
                getting.cancel()
                if watcher in done:
                    return  # the client left: stop producing
                await send({"type": "http.response.body", "body": KEEP_ALIVE, "more_body": True})
                continue
            chunk = getting.result()
            if chunk is None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _settle(self, producer: asyncio.Future[None]) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await producer
            except Exception as exc:  # the source failed mid-stream: the client sees the stream end without done
                log_event(
                    "event stream failed",
                    logging.ERROR,
                    **{DECISION_REASON: "stream-failed", "error_type": type(exc).__name__},
                )
        try:
            await self.source.close()
        except Exception as exc:
            log_event(
                "event stream close failed",
                logging.ERROR,
                **{DECISION_REASON: "stream-close-failed", "error_type": type(exc).__name__},
            )
