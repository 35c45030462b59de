"""The only module that talks to a model provider: the openai SDK, against any OpenAI-compatible API.

``openai`` is imported inside the functions that use it, so a function that never calls a model
never pays for importing it on a cold start. Clients are created lazily, one per running event
loop and configuration: Mangum may start a new loop per invocation, and an SDK client's HTTP pool
belongs to the loop it was first used on. Every client has ``max_retries=0``: a retried call may
have been billed already, and the caller's reservation covers exactly one call.

Failures come back as ``ProviderFailure`` with an outcome for the usage row (``timeout`` or
``error``), an enumerated reason for the log, and whether the provider may have billed the call:
a call that failed before its request body went out, or that the provider answered with an HTTP
error status, cannot have been billed; one that timed out or lost its connection after the body
went out may have been. ``track_call`` follows each call through the HTTP client's trace hooks to
know which (``CallProgress.body_sent``), for the caller's own cancellation too. The provider's own
error text never leaves this module, so it cannot reach a visitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shared.egress import EgressDenied, EgressPolicy, Resolver, guarded_client
from shared.gateway.answers import Completion, Embeddings, MalformedAnswer, completion_from, embeddings_from
from shared.gateway.schemas import ToolCall
from shared.gateway.tools import parse_arguments
from shared.logs import log_event
from shared.settings import Settings

if TYPE_CHECKING:
    import httpx2
    from openai import AsyncOpenAI

__all__ = ["Completion", "Embeddings"]

ProviderRole = Literal["system", "user", "assistant"]
FailureOutcome = Literal["error", "timeout"]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    api_key: str = field(repr=False)
    base_url: str
    timeout_seconds: float
    # An organization's own base URL is customer-supplied: its calls go through the egress guard.
    egress: EgressPolicy | None = None
    resolver: Resolver | None = None
    key_ref: uuid.UUID | None = None  # which stored organization key this is (shared.gateway.keys)


def config_from(settings: Settings) -> ProviderConfig | None:
    """The provider to call; ``None`` when no API key is configured (the offline provider answers)."""
    api_key = settings.openai_api_key.get_secret_value().strip()
    if not api_key:
        return None
    return ProviderConfig(api_key, settings.openai_base_url, settings.model_timeout_seconds)


class ProviderFailure(Exception):
    def __init__(self, outcome: FailureOutcome, reason: str, *, may_be_billed: bool) -> None:
        self.outcome: FailureOutcome = outcome
        self.reason = reason
        self.may_be_billed = may_be_billed
        """The request body went out and no HTTP answer said it was refused: the provider may be
        processing it, and may bill it."""
        super().__init__(reason)


@dataclass(slots=True)
class CallProgress:
    """How far the call in this context has gone, as the HTTP client reports it."""

    body_sent: bool = False
    """Sending the request body has begun: from here the provider may receive the whole request."""


_current_call: ContextVar[CallProgress | None] = ContextVar("model_call_progress", default=None)


@contextlib.contextmanager
def track_call() -> Iterator[CallProgress]:
    """Follow the provider call made inside this block (``complete`` or ``embed``)."""
    progress = CallProgress()
    token = _current_call.set(progress)
    try:
        yield progress
    finally:
        _current_call.reset(token)


async def _trace(event: str, _info: dict[str, Any]) -> None:
    # httpcore's trace events, e.g. "http11.send_request_body.started". The line is drawn at the
    # start of the body, not its end: bytes written before a cancellation may still be flushed
    # from the socket's buffer, and a call is never metered for less than it may have cost.
    if event.endswith("send_request_body.started"):
        progress = _current_call.get()
        if progress is not None:
            progress.body_sent = True


async def _follow(request: httpx2.Request) -> None:
    request.extensions["trace"] = _trace


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ProviderConfig, AsyncOpenAI]] = (
    weakref.WeakKeyDictionary()
)


def _client(config: ProviderConfig) -> AsyncOpenAI:
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(config)
    if client is None:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        client = AsyncOpenAI(
            api_key=config.api_key,
            base_url=config.base_url,
            timeout=config.timeout_seconds,
            max_retries=0,
            http_client=(
                _guarded_sdk_client(config)
                if config.egress is not None
                else DefaultAsyncHttpxClient(event_hooks={"request": [_follow]})
            ),
        )
        per_loop[config] = client
    return client


def _guarded_sdk_client(config: ProviderConfig) -> Any:
    """An SDK HTTP client whose every request goes out through the egress guard.

    The SDK speaks ``httpx2``; the guard is an ``httpx`` client. This transport hands each request
    to the guard (which vets the URL and, at connect time, the resolved address), with its trace
    hook (``CallProgress``), and the answer back, read whole: the guard caps its size, and the
    gateway's deadline bounds its time.
    """
    import httpx
    import httpx2

    assert config.egress is not None  # noqa: S101 - the caller checks
    guarded = guarded_client(policy=config.egress, resolver=config.resolver)

    class _ThroughEgressGuard(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            body = await request.aread()
            outgoing = guarded.build_request(
                request.method,
                str(request.url),
                headers=list(request.headers.raw),
                content=body,
                extensions={k: v for k, v in request.extensions.items() if k == "trace"},
            )
            try:
                response = await guarded.send(outgoing)
            except EgressDenied as exc:  # kept as the cause, so the failure is logged as a refusal
                raise httpx2.ConnectError("the egress guard refused the model provider", request=request) from exc
            except httpx.TimeoutException:
                raise httpx2.ReadTimeout("the model provider did not answer in time", request=request) from None
            except httpx.HTTPError:
                raise httpx2.ConnectError("the model provider could not be reached", request=request) from None
            return httpx2.Response(response.status_code, headers=response.headers.raw, content=response.content)

        async def aclose(self) -> None:
            await guarded.aclose()

    return httpx2.AsyncClient(transport=_ThroughEgressGuard(), event_hooks={"request": [_follow]})


async def close_clients() -> None:
    """Close the running loop's clients (test teardown, the end of a worker run)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


@contextlib.asynccontextmanager
async def _provider_call(config: ProviderConfig) -> AsyncIterator[None]:
    """The call's deadline, and the SDK's failures as our outcomes: the provider's text stays here."""
    import openai

    progress = _current_call.get() or CallProgress()
    try:
        async with asyncio.timeout(config.timeout_seconds):
            yield
    except (TimeoutError, openai.APITimeoutError):
        raise ProviderFailure("timeout", "model-timeout", may_be_billed=progress.body_sent) from None
    except openai.APIStatusError as exc:
        raise ProviderFailure("error", f"model-status-{exc.status_code}", may_be_billed=False) from None
    except openai.APIConnectionError as exc:
        # Refused, unreachable, TLS: nothing went out. Reset while the provider was working: as a timeout.
        denied = isinstance(getattr(exc.__cause__, "__cause__", None), EgressDenied)
        reason = "model-egress-denied" if denied else "model-connection"
        raise ProviderFailure("error", reason, may_be_billed=progress.body_sent and not denied) from None
    except openai.OpenAIError:
        raise ProviderFailure("error", "model-error", may_be_billed=False) from None


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
    """One chat completion. ``request_id`` goes to the provider as ``X-Client-Request-Id``."""
    import httpx2

    # The request body is built in its wire format and sent with the SDK's raw `post`: the typed
    # `chat.completions.create` re-walks every message and tool schema through typing introspection
    # (about 20 ms a call on a 20-message history), which dominated the widget's latency. The answer
    # is read as raw bytes and checked in `answers` (the SDK's models do not validate); errors and
    # timeouts are the SDK's own.
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
            cast_to=httpx2.Response,
            body=body,
            options={"headers": {"X-Client-Request-Id": request_id}},
        )
    try:
        return completion_from(response.content, provider_request_id=_provider_request_id(response))
    except MalformedAnswer:
        raise ProviderFailure("error", "model-malformed-response", may_be_billed=False) from None


async def embed(
    config: ProviderConfig, *, model: str, texts: list[str], dimensions: int, request_id: str
) -> Embeddings:
    """Embeddings of ``texts``. ``request_id`` goes to the provider as ``X-Client-Request-Id``."""
    import httpx2

    # As for chat, the SDK's raw `post` (errors and timeouts still the SDK's): the typed
    # `embeddings.create` costs about twice the CPU of the whole request. The vectors come as
    # base64 little-endian float32.
    client = _client(config)
    async with _provider_call(config):
        response = await client.post(
            "/embeddings",
            cast_to=httpx2.Response,
            body={"model": model, "input": texts, "encoding_format": "base64"},
            options={"headers": {"X-Client-Request-Id": request_id}},
        )
    try:
        return embeddings_from(
            response.content,
            texts=len(texts),
            dimensions=dimensions,
            provider_request_id=_provider_request_id(response),
        )
    except MalformedAnswer:
        raise ProviderFailure("error", "model-malformed-response", may_be_billed=False) from None


def _provider_request_id(response: httpx2.Response) -> str | None:
    value = response.headers.get("x-request-id", "").strip()
    return value[:512] if value and value.isascii() and value.isprintable() else None


async def fetch_organization_report(
    *, admin_key: str, base_url: str, path: str, params: dict[str, Any], timeout_seconds: float
) -> bytes:
    """One page of the provider's organization usage or costs report (``GET {base_url}{path}``),
    raw, for the reconciliation (``shared.reconciliation``), with an admin key. Raises
    ``ProviderFailure`` like a model call (never billed: reports are free)."""
    import httpx2
    from openai import AsyncOpenAI

    config = ProviderConfig(admin_key, base_url, timeout_seconds)
    async with AsyncOpenAI(api_key=admin_key, base_url=base_url, timeout=timeout_seconds, max_retries=2) as client:
        try:
            async with _provider_call(config):
                response = await client.get(path, cast_to=httpx2.Response, options={"params": params})
        except ProviderFailure as failure:
            raise ProviderFailure(failure.outcome, failure.reason, may_be_billed=False) from None
    return response.content


# -- streamed chat ----------------------------------------------------------------------------------

STREAM_MAX_SECONDS = 120.0
"""The longest a streamed reply may take in all; ``timeout_seconds`` bounds each wait for a chunk."""


@dataclass(slots=True)
class StreamedCompletion:
    """What a streamed completion has produced so far: filled in by ``stream_complete`` chunk by chunk.

    ``request_sent`` once the request body started going out (from then on the provider may bill
    the call); ``finished`` once the provider sent its finish reason; ``prompt_tokens`` and
    ``completion_tokens`` once it sent the usage chunk (``stream_options.include_usage``), which
    comes after the finish reason and which some compatible servers never send.
    """

    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, tuple[list[str], list[str]]] = field(default_factory=dict)
    """Per tool-call index: the name's pieces and the arguments' pieces, as they arrived."""
    request_sent: bool = False
    finished: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    provider_request_id: str | None = None

    def text(self) -> str:
        return "".join(self.content)

    def calls(self) -> list[ToolCall]:
        """The tool calls of a finished stream, their arguments parsed (``{}`` when not a JSON object)."""
        calls: list[ToolCall] = []
        for _, (name, arguments) in sorted(self.tool_calls.items()):
            parsed = parse_arguments("".join(arguments))
            if parsed is None:
                # Keep the intent (a visitor asking for a person still is one); the caller validates values.
                log_event("tool arguments were not a JSON object", decision_reason="tool-arguments-invalid")
                parsed = {}
            calls.append(ToolCall("".join(name), parsed))
        return calls

    def add(self, chunk: Any) -> str:
        """Take one ``chat.completion.chunk`` (a dict, as sent); returns its text, if any."""
        usage = chunk.get("usage")
        if usage is not None:
            prompt_tokens, completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            if not all(type(n) is int and n >= 0 for n in (prompt_tokens, completion_tokens)):
                raise ValueError("usage counts must be non-negative integers")
            self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
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
    ``request_id`` goes to the provider as ``X-Client-Request-Id``.

    Raises ``ProviderFailure`` when the provider refuses, fails mid-stream, sends something
    unusable, sends nothing for ``timeout_seconds`` (a stall), or passes ``STREAM_MAX_SECONDS`` in
    all; what arrived before stays in ``into``. A failure once the stream has started may have been
    billed. Closing the generator early closes the provider's stream (the model stops writing).

    The deadlines are taken around each wait, never across a ``yield``: a deadline that spanned one
    would fire in whatever the consumer was doing at the time.
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
    deadline = asyncio.get_running_loop().time() + STREAM_MAX_SECONDS
    with track_call() as progress:
        try:
            async with _provider_call(config):
                # Chunks come back as the dicts they were sent as: the SDK's chunk models would cost
                # a pydantic construction per word.
                stream = await client.post(
                    "/chat/completions",
                    cast_to=object,
                    body=body,
                    options={"headers": {"X-Client-Request-Id": request_id}},
                    stream=True,
                    stream_cls=AsyncStream[object],
                )
        finally:
            into.request_sent = progress.body_sent
    into.request_sent = True
    into.provider_request_id = _provider_request_id(stream.response)
    chunks = aiter(stream)
    try:
        while True:
            try:
                async with _provider_call(config), asyncio.timeout_at(deadline):
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        break
                text = into.add(chunk)
            except ProviderFailure as failure:  # the provider accepted the call: it may bill it
                raise ProviderFailure(failure.outcome, failure.reason, may_be_billed=True) from None
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                raise ProviderFailure("error", "model-malformed-response", may_be_billed=True) from None
            if text:
                yield text
    finally:
        await stream.close()
    if not into.finished:
        # The connection ended without a finish reason: the reply may be cut anywhere.
        raise ProviderFailure("error", "model-stream-incomplete", may_be_billed=True)
