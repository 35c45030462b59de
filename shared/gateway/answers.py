"""What a provider's answer must look like before anything is metered or shown: checked here, once.

The SDK's models do not validate (a reply ``content`` of ``42`` or ``{}`` comes through as is), so the
gateway reads the raw body itself and accepts only the documented shape: a JSON object, a first
choice whose ``content`` is a string or ``null``, tool calls of type ``function`` with a string name
and string arguments, and token counts that are integers from 0 to 2^31-1 (the usage columns are
``integer``; no model has a context near that size, so a larger count is a broken answer, not a
bill). Anything else raises ``MalformedAnswer``; the provider module turns it into outcome ``error``.
"""

from __future__ import annotations

import array
import base64
import binascii
import json
import sys
from dataclasses import dataclass
from typing import Any

from shared.gateway.schemas import ToolCall
from shared.gateway.tools import parse_arguments
from shared.logs import log_event

MAX_TOKEN_COUNT = 2**31 - 1


class MalformedAnswer(Exception):
    """The provider answered 2xx with something that is not the documented shape."""


@dataclass(frozen=True, slots=True)
class Completion:
    content: str
    tool_calls: list[ToolCall]
    prompt_tokens: int | None
    completion_tokens: int | None
    provider_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int | None
    provider_request_id: str | None = None


def completion_from(body: bytes, *, provider_request_id: str | None = None) -> Completion:
    payload = _json_object(body)
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise MalformedAnswer("no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise MalformedAnswer("no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedAnswer("content is not text")
    calls = _tool_calls(message.get("tool_calls"))
    prompt_tokens, completion_tokens = _usage(payload, ("prompt_tokens", "completion_tokens"))
    return Completion(content or "", calls, prompt_tokens, completion_tokens, provider_request_id)


def embeddings_from(body: bytes, *, texts: int, dimensions: int, provider_request_id: str | None = None) -> Embeddings:
    payload = _json_object(body)
    data = payload.get("data")
    if not isinstance(data, list) or len(data) != texts or not all(isinstance(item, dict) for item in data):
        raise MalformedAnswer("not one vector per text")
    indexes = [item.get("index") for item in data]
    if sorted(i for i in indexes if _is_count(i)) != list(range(texts)):
        raise MalformedAnswer("vector indexes are not 0..n-1")
    vectors = [_float32s(item.get("embedding")) for item in sorted(data, key=lambda item: item["index"])]
    if any(len(vector) != dimensions for vector in vectors):
        raise MalformedAnswer("vectors of the wrong width")
    (prompt_tokens,) = _usage(payload, ("prompt_tokens",))
    return Embeddings(vectors, prompt_tokens, provider_request_id)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's depth
        raise MalformedAnswer("the body is not JSON") from None
    if not isinstance(payload, dict):
        raise MalformedAnswer("the body is not a JSON object")
    return payload


def _tool_calls(raw: object) -> list[ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise MalformedAnswer("tool_calls is not a list")
    calls: list[ToolCall] = []
    for call in raw:
        if not isinstance(call, dict):
            raise MalformedAnswer("a tool call is not an object")
        if call.get("type") != "function":
            continue  # another kind of tool (none is offered); nothing to run
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise MalformedAnswer("a tool call has no function name")
        raw_arguments = function.get("arguments")
        if raw_arguments is not None and not isinstance(raw_arguments, str):
            raise MalformedAnswer("tool arguments are not text")
        try:
            arguments = parse_arguments(raw_arguments)
        except RecursionError:
            arguments = None
        if arguments is None:
            # Keep the intent (a visitor asking for a person still is one); the caller validates values.
            log_event("tool arguments were not a JSON object", decision_reason="tool-arguments-invalid")
            arguments = {}
        calls.append(ToolCall(function["name"], arguments))
    return calls


def _usage(payload: dict[str, Any], fields: tuple[str, ...]) -> tuple[int | None, ...]:
    """The token counts, or ``None`` for each when the answer has no ``usage`` (some compatible
    servers): the caller then meters the reserved bound."""
    usage = payload.get("usage")
    if usage is None:
        return tuple(None for _ in fields)
    if not isinstance(usage, dict):
        raise MalformedAnswer("usage is not an object")
    counts = tuple(usage.get(name) for name in fields)
    if not all(_is_count(count) for count in counts):
        raise MalformedAnswer("a token count is not an integer from 0 to 2^31-1")
    return counts


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT


def _float32s(encoded: object) -> list[float]:
    """A base64 little-endian float32 vector (what ``encoding_format: base64`` returns), decoded the
    way the SDK itself decodes it."""
    if not isinstance(encoded, str):
        raise MalformedAnswer("a vector is not base64 text")
    try:
        values = array.array("f", base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        raise MalformedAnswer("a vector is not base64 float32") from None
    if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian
        values.byteswap()
    return values.tolist()
