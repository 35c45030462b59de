"""A loopback TCP peer that accepts connections, reads what it is sent and never answers: a Redis
(or its REST front) that is up but hung. It can be switched to forward to a real server, to play
the same endpoint recovering."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class HungPeer:
    port: int = 0
    requests: int = 0
    """HTTP requests received (request lines seen), answered or not."""
    forward_to: tuple[str, int] | None = None
    """Once set, new connections are relayed to this address instead of hanging."""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.forward_to is not None:
                await self._relay(reader, writer, *self.forward_to)
                return
            while chunk := await reader.read(65536):
                self.requests += chunk.count(b" HTTP/1.1\r\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: bool) -> None:
            while chunk := await source.read(65536):
                if count:
                    self.requests += chunk.count(b" HTTP/1.1\r\n")
                sink.write(chunk)
                await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pipe(reader, upstream_writer, True), pipe(upstream_reader, writer, False))
        finally:
            upstream_writer.close()


@contextlib.asynccontextmanager
async def hung_peer() -> AsyncIterator[HungPeer]:
    peer = HungPeer()
    server = await asyncio.start_server(peer._serve, "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        for task in list(peer._tasks):
            task.cancel()
        await asyncio.gather(*peer._tasks, return_exceptions=True)
        await server.wait_closed()
