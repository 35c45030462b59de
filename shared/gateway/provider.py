"""The only module that talks to a model provider: the openai SDK, against any OpenAI-compatible API.

``openai`` is imported inside the functions that use it, so a function that never calls a model
never pays for importing it on a cold start. Clients are created lazily, one per running event
loop and configuration: Mangum may start a new loop per invocation, and an SDK client's HTTP pool
belongs to the loop it was first used on. Every client has ``max_retries=0``: a retried call may
have been billed already, and the caller's reservation covers exactly one call.

Failures come back as ``ProviderFailure`` with an outcome for the usage row (``timeout`` or
``error``) and an enumerated reason for the log; the provider's own error text never leaves this
module, so it cannot reach a visitor.
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import contextlib
import json
import sys
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shared.gateway.schemas import ToolCall
from shared.gateway.tools import parse_arguments
from shared.logs import log_event
from shared.settings import Settings

if TYPE_CHECKING:
    from openai import AsyncOpenAI

ProviderRole = Literal["system", "user", "assistant"]
FailureOutcome = Literal["error", "timeout"]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    api_key: str
    base_url: str
    timeout_seconds: float


def config_from(settings: Settings) -> ProviderConfig | None:
    """The provider to call; ``None`` when no API key is configured (the offline provider answers)."""
    api_key = settings.openai_api_key.get_secret_value().strip()
    if not api_key:
        return None
    return ProviderConfig(api_key, settings.openai_base_url, settings.model_timeout_seconds)


class ProviderFailure(Exception):
    def __init__(self, outcome: FailureOutcome, reason: str) -> None:
        self.outcome: FailureOutcome = outcome
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    tool_calls: list[ToolCall]
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int | None


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ProviderConfig, AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)


def _client(config: ProviderConfig) -> AsyncOpenAI:
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(config)
    if client is None:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            api_key=config.api_key,
            base_url=config.base_url,
            timeout=config.timeout_seconds,
            max_retries=0,
        )
        per_loop[config] = client
    return client


async def close_clients() -> None:
    """Close the running loop's clients (test teardown, the end of a worker run)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


@contextlib.asynccontextmanager
async def _provider_call(config: ProviderConfig) -> AsyncIterator[None]:
    """The call's deadline, and the SDK's failures as our outcomes: the provider's text stays here."""
    async with _failures(), asyncio.timeout(config.timeout_seconds):
        yield


@contextlib.asynccontextmanager
async def _failures() -> AsyncIterator[None]:
    """The SDK's failures and our deadlines as ``ProviderFailure``."""
    import openai

    try:
        yield
    except (TimeoutError, openai.APITimeoutError):
        raise ProviderFailure("timeout", "model-timeout") from None
    except openai.APIStatusError as exc:
        raise ProviderFailure("error", f"model-status-{exc.status_code}") from None
    except openai.APIConnectionError:
        raise ProviderFailure("error", "model-connection") from None
    except openai.OpenAIError:
        raise ProviderFailure("error", "model-error") from None


async def complete(
    config: ProviderConfig,
    *,
    model: str,
    messages: Sequence[tuple[ProviderRole, str]],
    tools: list[dict[str, Any]] | None,
    max_tokens: int,
    temperature: float,
    request_id: str,
) -> Completion:
    from openai.types.chat import ChatCompletion

    # The request body is built in its wire format and sent with the SDK's raw `post`: the typed
    # `chat.completions.create` re-walks every message and tool schema through typing introspection
    # (about 20 ms a call on a 20-message history), which dominated the widget's latency. Responses
    # are still parsed into the SDK's models, and errors and timeouts are the SDK's own.
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": role, "content": content} for role, content in messages],
        "max_completion_tokens": max_tokens,
        "temperature": temperature,
    }
    if tools:
        body["tools"] = tools
    client = _client(config)
    async with _provider_call(config):
        response = await client.post(
            "/chat/completions",
            cast_to=ChatCompletion,
            body=body,
            options={"headers": {"X-Client-Request-Id": request_id}},
        )

    try:
        message = response.choices[0].message
        calls: list[ToolCall] = []
        for call in message.tool_calls or []:
            if call.type != "function":
                continue
            arguments = parse_arguments(call.function.arguments)
            if arguments is None:
                # Keep the intent (a visitor asking for a person still is one); the caller validates values.
                log_event("tool arguments were not a JSON object", decision_reason="tool-arguments-invalid")
                arguments = {}
            calls.append(ToolCall(call.function.name, arguments))
        usage = response.usage
        return Completion(
            content=message.content or "",
            tool_calls=calls,
            prompt_tokens=usage.prompt_tokens if usage is not None else None,
            completion_tokens=usage.completion_tokens if usage is not None else None,
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        raise ProviderFailure("error", "model-malformed-response") from None


async def embed(config: ProviderConfig, *, model: str, texts: list[str], dimensions: int) -> Embeddings:
    # As for chat, the SDK's raw `post` (errors and timeouts still the SDK's): the typed
    # `embeddings.create` costs about twice the CPU of the whole request. The vectors come as
    # base64 little-endian float32, decoded the way the SDK itself decodes them.
    client = _client(config)
    async with _provider_call(config):
        raw = await client.post(
            "/embeddings",
            cast_to=bytes,
            body={"model": model, "input": texts, "encoding_format": "base64"},
        )

    try:
        payload = json.loads(raw)
        ordered = sorted(payload["data"], key=lambda item: item["index"])
        vectors = [_float32s(item["embedding"]) for item in ordered]
        usage = payload.get("usage")
        prompt_tokens = int(usage["prompt_tokens"]) if isinstance(usage, dict) else None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, binascii.Error):
        raise ProviderFailure("error", "model-malformed-response") from None
    if len(vectors) != len(texts) or any(len(v) != dimensions for v in vectors):
        raise ProviderFailure("error", "model-malformed-response")
    return Embeddings(vectors, prompt_tokens)


def _float32s(encoded: str) -> list[float]:
    values = array.array("f", base64.b64decode(encoded, validate=True))
    if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian
        values.byteswap()
    return values.tolist()


# -- streamed chat ----------------------------------------------------------------------------------

STREAM_MAX_SECONDS = 120.0
"""The longest a streamed reply may take in all; ``timeout_seconds`` bounds each wait for a chunk."""


@dataclass(slots=True)
class StreamedCompletion:
    """What a streamed completion has produced so far: filled in by ``stream_complete`` chunk by chunk.

    ``finished`` once the provider sent its finish reason; ``prompt_tokens`` and ``completion_tokens``
    once it sent the usage chunk (``stream_options.include_usage``), which comes after the finish
    reason and which some compatible servers never send.
    """

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, tuple[list[str], list[str]]] = field(default_factory=dict)
    """Per tool-call index: the name's pieces and the arguments' pieces, as they arrived."""
    finished: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def text(self) -> str:
        return "".join(self.content)

    def calls(self) -> list[ToolCall]:
        """The tool calls of a finished stream, their arguments parsed (``{}`` when not a JSON object)."""
        calls: list[ToolCall] = []
        for _, (name, arguments) in sorted(self.tool_calls.items()):
            parsed = parse_arguments("".join(arguments))
            if parsed is None:
                log_event("tool arguments were not a JSON object", decision_reason="tool-arguments-invalid")
                parsed = {}
            calls.append(ToolCall("".join(name), parsed))
        return calls

    def add(self, chunk: Any) -> str:
        """Take one ``chat.completion.chunk`` (a dict, as sent); returns its text, if any."""
        usage = chunk.get("usage")
        if usage is not None:
            self.prompt_tokens = int(usage["prompt_tokens"])
            self.completion_tokens = int(usage["completion_tokens"])
        text = ""
        for choice in chunk["choices"]:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if piece:
                text += str(piece)
            for call in delta.get("tool_calls") or []:
                name, arguments = self.tool_calls.setdefault(int(call["index"]), ([], []))
                function = call.get("function") or {}
                if function.get("name"):
                    name.append(str(function["name"]))
                if function.get("arguments"):
                    arguments.append(str(function["arguments"]))
            if choice.get("finish_reason"):
                self.finished = True
        if text:
            self.content.append(text)
        return text


async def stream_complete(
    config: ProviderConfig,
    *,
    model: str,
    messages: Sequence[tuple[ProviderRole, str]],
    tools: list[dict[str, Any]] | None,
    max_tokens: int,
    temperature: float,
    request_id: str,
    into: StreamedCompletion,
) -> AsyncIterator[str]:
    """A streamed chat completion: yields each piece of text as it arrives and fills ``into``.

    Raises ``ProviderFailure`` when the provider refuses, fails mid-stream, sends something
    unusable, sends nothing for ``timeout_seconds`` (a stall), or passes ``STREAM_MAX_SECONDS`` in
    all; what arrived before stays in ``into``. Closing the generator early closes the provider's
    stream (the model stops writing).

    The deadlines are taken around each wait for a chunk, never across a ``yield``: a deadline
    that spanned one would fire in whatever the consumer was doing at the time.
    """
    from openai import AsyncStream

    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": role, "content": content} for role, content in messages],
        "max_completion_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = tools
    client = _client(config)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STREAM_MAX_SECONDS
    async with _failures(), asyncio.timeout_at(min(deadline, loop.time() + config.timeout_seconds)):
        # Chunks come back as the dicts they were sent as: the SDK's chunk models would cost a
        # pydantic construction per word.
        stream = await client.post(
            "/chat/completions",
            cast_to=object,
            body=body,
            options={"headers": {"X-Client-Request-Id": request_id}},
            stream=True,
            stream_cls=AsyncStream[object],
        )
    chunks = aiter(stream)
    try:
        while True:
            async with _failures(), asyncio.timeout_at(min(deadline, loop.time() + config.timeout_seconds)):
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
            try:
                text = into.add(chunk)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                raise ProviderFailure("error", "model-malformed-response") from None
            if text:
                yield text
    finally:
        await stream.close()
    if not into.finished:
        # The connection ended without a finish reason: the reply may be cut anywhere.
        raise ProviderFailure("error", "model-stream-incomplete")
