"""A loopback OpenAI-compatible server: the model provider, replaced at the network edge.

``start_fake_openai()`` serves, on 127.0.0.1 and a free port, in a thread of its own:

* ``POST /v1/chat/completions``: a ``chat.completion`` with the scripted ``reply`` (text and/or
  function tool calls) and its usage;
* ``GET /v1/models``: the model list (what a key may use);
* ``POST /v1/embeddings``: one deterministic unit vector per input (derived from the text, or
  taken from ``vectors``), as floats or base64 (what the SDK asks for by default), with usage.

Every request is recorded (path, JSON body, headers) before anything else happens, so a test can
assert that no call was made at all. ``delay_seconds`` holds each answer back (timeouts),
``fail_status`` answers with an OpenAI-shaped error, ``raw_body`` answers with any JSON at all and
``raw_bytes`` with any bytes at all. ``GET /v1/organization/usage/completions``,
``/usage/embeddings`` and ``/costs`` serve the buckets in ``organization_reports`` (by path) as the
admin usage API does: pages of ``page_size`` buckets linked by ``next_page`` cursors, only to
``admin_key``. Every answer carries an ``x-request-id``, as OpenAI's do
(``answered_ids``). ``billed_tokens()`` is what the server would bill for the chat requests it
received, answered in time or not: the most each could cost, a token per byte of the request's
messages and tools and every completion token it allowed.
A wrong bearer token gets a 401, as from OpenAI. Tests point the gateway at it with
``OPENAI_BASE_URL=<fake.base_url>`` and ``OPENAI_API_KEY=<fake.api_key>``.

A chat request with ``"stream": true`` is answered as OpenAI streams: ``chat.completion.chunk``
events (the reply's words one by one, then the tool calls with their arguments in pieces, then the
finish reason), a last chunk with ``usage`` and no choices when the request asked for it
(``stream_options.include_usage``) and the reply has token counts, then ``data: [DONE]``.
``first_token_seconds`` holds the first chunk back and ``token_interval_seconds`` paces the rest;
``stream_fail_after`` ends the stream with an in-stream error event after that many words, and
``stream_stall_after`` stops sending (without closing) after that many words.
``streams_closed_early`` counts the streams whose client went away before the end.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import random
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class ScriptedReply:
    content: Any = "Happy to help with that."
    """Usually text or ``None``; anything JSON can hold, to send a malformed answer."""
    tool_calls: list[tuple[str, dict[str, Any] | str]] = field(default_factory=list)
    """(name, arguments): a dict is sent as JSON, a string as it is (to send malformed arguments)."""
    prompt_tokens: Any = 100
    completion_tokens: Any = 20
    """``None`` for either: the response has no ``usage`` object, as some compatible servers do;
    anything else JSON can hold is sent as it is."""


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


class FakeOpenAI:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.request_arrived = threading.Event()
        """Set when a request arrives (the server runs in another thread; wait with ``asyncio.to_thread``)."""
        self.reply = ScriptedReply()
        self.delay_seconds = 0.0
        self.fail_status: int | None = None
        self.raw_body: Any = None
        self.raw_bytes: bytes | None = None
        self.answered_ids: list[str] = []
        self.embedding_dimensions = 1536
        self.vectors: dict[str, list[float]] = {}
        self.admin_key = f"sk-admin-fake-{secrets.token_hex(8)}"
        self.organization_reports: dict[str, list[dict[str, Any]]] = {}
        self.page_size = 7
        self.report_requests: list[tuple[str, dict[str, str]]] = []
        self.first_token_seconds = 0.0
        self.token_interval_seconds = 0.0
        self.stream_fail_after: int | None = None
        self.stream_stall_after: int | None = None
        self.streams_closed_early = 0
        self.stream_closed = threading.Event()
        """Set when a stream's client went away before its end."""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        self.requests.clear()
        self.request_arrived.clear()
        self.reply = ScriptedReply()
        self.delay_seconds = 0.0
        self.fail_status = None
        self.raw_body = None
        self.raw_bytes = None
        self.answered_ids = []
        self.embedding_dimensions = 1536
        self.vectors = {}
        self.organization_reports = {}
        self.page_size = 7
        self.report_requests = []
        self.first_token_seconds = 0.0
        self.token_interval_seconds = 0.0
        self.stream_fail_after = None
        self.stream_stall_after = None
        self.streams_closed_early = 0
        self.stream_closed.clear()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def billed_tokens(self) -> list[tuple[int, int]]:
        """(prompt, completion) tokens this server would bill for each chat request it received."""
        billed = []
        for request in self.requests_to("/v1/chat/completions"):
            prompt = sum(len(str(m.get("content", "")).encode()) for m in request.body.get("messages", []))
            prompt += len(json.dumps(request.body.get("tools", []), separators=(",", ":")).encode())
            billed.append((prompt, int(request.body.get("max_completion_tokens", 0))))
        return billed

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)

    # -- the app -------------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/organization/usage/completions", self._report, methods=["GET"]),
                Route("/v1/organization/usage/embeddings", self._report, methods=["GET"]),
                Route("/v1/organization/costs", self._report, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    async def _report(self, request: Request) -> Response:
        path = request.url.path.removeprefix("/v1")
        params = dict(request.query_params)
        self.report_requests.append((path, params))
        if request.headers.get("authorization") != f"Bearer {self.admin_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        start, end = int(params["start_time"]), int(params.get("end_time", 2**62))
        buckets = [b for b in self.organization_reports.get(path, []) if start <= b["start_time"] < end]
        offset = int(params.get("page") or 0)
        page = buckets[offset : offset + self.page_size]
        more = offset + self.page_size < len(buckets)
        return JSONResponse(
            {
                "object": "page",
                "data": page,
                "has_more": more,
                "next_page": str(offset + self.page_size) if more else None,
            }
        )

    async def _prelude(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        body = await request.json()
        self.requests.append(RecordedRequest(request.url.path, body, dict(request.headers)))
        self.request_arrived.set()
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return body, _error(401, "Incorrect API key provided.", "invalid_request_error")
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if self.fail_status is not None:
            return body, _error(self.fail_status, "The server had an error processing your request.", "server_error")
        if self.raw_bytes is not None:
            return body, self._answered(Response(self.raw_bytes, media_type="application/json"))
        if self.raw_body is not None:
            return body, self._answered(JSONResponse(self.raw_body))
        return body, None

    async def _models(self, request: Request) -> JSONResponse:
        """``GET /v1/models``: what a key may use (the cheapest call that proves a key works)."""
        self.requests.append(RecordedRequest(request.url.path, {}, dict(request.headers)))
        self.request_arrived.set()
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        if self.fail_status is not None:
            return _error(self.fail_status, "The server had an error processing your request.", "server_error")
        models = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "system"} for m in models]
        return JSONResponse({"object": "list", "data": data})

    def _answered[R: Response](self, response: R) -> R:
        request_id = f"req_{secrets.token_hex(16)}"
        self.answered_ids.append(request_id)
        response.headers["x-request-id"] = request_id
        return response

    async def _chat(self, request: Request) -> Response:
        body, early = await self._prelude(request)
        if early is not None:
            return early
        if body.get("stream") is True:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._answered(StreamingResponse(self._chunks(body, include_usage), media_type="text/event-stream"))
        reply = self.reply
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{secrets.token_hex(8)}",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                    },
                }
                for name, arguments in reply.tool_calls
            ]
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                    "logprobs": None,
                }
            ],
        }
        if reply.prompt_tokens is not None and reply.completion_tokens is not None:
            payload["usage"] = {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": _total(reply.prompt_tokens, reply.completion_tokens),
            }
        return self._answered(JSONResponse(payload))

    async def _chunks(self, body: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
        reply = self.reply
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.get("model", ""),
                "choices": choices,
                "usage": usage,
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        def delta(values: dict[str, Any], finish_reason: str | None = None) -> bytes:
            return chunk([{"index": 0, "delta": values, "finish_reason": finish_reason, "logprobs": None}])

        words = re.findall(r"\S+\s*", reply.content or "")
        finished = False
        try:
            await asyncio.sleep(self.first_token_seconds)
            yield delta({"role": "assistant", "content": "", "refusal": None})
            for sent, word in enumerate(words):
                if self.stream_fail_after is not None and sent >= self.stream_fail_after:
                    error = {"message": "The server had an error processing your request.", "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n".encode()
                    finished = True
                    return
                if self.stream_stall_after is not None and sent >= self.stream_stall_after:
                    await asyncio.sleep(3600)
                if sent:
                    await asyncio.sleep(self.token_interval_seconds)
                yield delta({"content": word})
            for index, (name, arguments) in enumerate(reply.tool_calls):
                encoded = arguments if isinstance(arguments, str) else json.dumps(arguments)
                opening = {"index": index, "id": f"call_{secrets.token_hex(8)}", "type": "function"}
                yield delta({"tool_calls": [{**opening, "function": {"name": name, "arguments": ""}}]})
                for start in range(0, len(encoded), 7):
                    piece = encoded[start : start + 7]
                    yield delta({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            yield delta({}, "tool_calls" if reply.tool_calls else "stop")
            if include_usage and reply.prompt_tokens is not None and reply.completion_tokens is not None:
                usage = {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                }
                yield chunk([], usage)
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.streams_closed_early += 1
                self.stream_closed.set()

    async def _embeddings(self, request: Request) -> Response:
        body, early = await self._prelude(request)
        if early is not None:
            return early
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = self.vectors.get(text) or unit_vector(text, self.embedding_dimensions)
            encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(str(text).split()) for text in texts)
        return self._answered(
            JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "model": body.get("model", ""),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            )
        )


def _total(prompt_tokens: Any, completion_tokens: Any) -> Any:
    both_counts = all(isinstance(n, int | float) for n in (prompt_tokens, completion_tokens))
    return prompt_tokens + completion_tokens if both_counts else None


def unit_vector(text: str, dimensions: int = 1536) -> list[float]:
    """A deterministic pseudo-random unit vector for ``text`` (a fresh list each time)."""
    return list(_unit_vector(text, dimensions))


@functools.lru_cache(maxsize=1024)
def _unit_vector(text: str, dimensions: int) -> tuple[float, ...]:
    # Cached so that the fake answers a repeated text at once, as the widget bench needs of an
    # "instantly answering" model: drawing 1536 Gaussians costs about a millisecond.
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = sum(x * x for x in raw) ** 0.5
    return tuple(x / norm for x in raw)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def start_fake_openai(*, startup_timeout_seconds: float = 10.0) -> FakeOpenAI:
    fake = FakeOpenAI(api_key=f"sk-fake-{secrets.token_hex(12)}")
    # IPPROTO_TCP so asyncio sets TCP_NODELAY (no delayed-ACK stalls on loopback).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()[:2]
    config = uvicorn.Config(fake.app(), lifespan="off", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="fake-openai", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            listener.close()
            raise RuntimeError("the fake OpenAI server did not start")
        time.sleep(0.01)
    fake.base_url = f"http://{host}:{port}/v1"
    fake._server, fake._thread = server, thread
    return fake


@contextmanager
def running_fake_openai() -> Iterator[FakeOpenAI]:
    fake = start_fake_openai()
    try:
        yield fake
    finally:
        fake.stop()
