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
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from shared.egress import EgressDenied, EgressPolicy, Resolver, guarded_client
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
            http_client=_guarded_sdk_client(config) if config.egress is not None else None,
        )
        per_loop[config] = client
    return client


def _guarded_sdk_client(config: ProviderConfig) -> Any:
    """An SDK HTTP client whose every request goes out through the egress guard.

    The SDK speaks ``httpx2``; the guard is an ``httpx`` client. This transport hands each request
    to the guard (which vets the URL and, at connect time, the resolved address) and the answer
    back, read whole: the guard caps its size, and the gateway's deadline bounds its time.
    """
    import httpx
    import httpx2

    assert config.egress is not None  # noqa: S101 - the caller checks
    guarded = guarded_client(policy=config.egress, resolver=config.resolver)

    class _ThroughEgressGuard(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            body = await request.aread()
            try:
                response = await guarded.request(
                    request.method, str(request.url), headers=list(request.headers.raw), content=body
                )
            except httpx.TimeoutException:
                raise httpx2.ReadTimeout("the model provider did not answer in time", request=request) from None
            except EgressDenied as exc:  # kept as the cause, so the failure is logged as a refusal
                raise httpx2.ConnectError("the egress guard refused the model provider", request=request) from exc
            except httpx.HTTPError:
                raise httpx2.ConnectError("the model provider could not be reached", request=request) from None
            return httpx2.Response(response.status_code, headers=response.headers.raw, content=response.content)

        async def aclose(self) -> None:
            await guarded.aclose()

    return httpx2.AsyncClient(transport=_ThroughEgressGuard())


async def close_clients() -> None:
    """Close the running loop's clients (test teardown, the end of a worker run)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


@contextlib.asynccontextmanager
async def _provider_call(config: ProviderConfig) -> AsyncIterator[None]:
    """The call's deadline, and the SDK's failures as our outcomes: the provider's text stays here."""
    import openai

    try:
        async with asyncio.timeout(config.timeout_seconds):
            yield
    except (TimeoutError, openai.APITimeoutError):
        raise ProviderFailure("timeout", "model-timeout") from None
    except openai.APIStatusError as exc:
        raise ProviderFailure("error", f"model-status-{exc.status_code}") from None
    except openai.APIConnectionError as exc:
        denied = isinstance(getattr(exc.__cause__, "__cause__", None), EgressDenied)
        raise ProviderFailure("error", "model-egress-denied" if denied else "model-connection") from None
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
