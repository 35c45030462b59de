"""Streamed chat completions, metered like every other model call.

``open_chat_stream`` does everything that can refuse a call before anything is shown: the checks
of ``chat``, the burst limit and the budget reservation. It raises exactly what ``chat`` raises
(``RateLimited``, ``BudgetExhausted``, ``UnknownModel``, ``DependencyUnavailable``), so a caller can
still answer with an error instead of a stream. It returns a ``ChatStream``:

* ``deltas()`` calls the model and yields the reply's text as it arrives. A model that fails,
  stalls or sends something unusable mid-stream ends the iteration quietly; ``finish`` says so.
* ``finish()`` must follow, always (in a ``finally``): it writes the call's one usage row and
  settles its reservation, exactly once however often it is called and even when the caller is
  cancelled while it runs, and returns a ``StreamedChat`` saying how the stream ended.

How each ending is metered (the rule of docs/gateway.md: never less than the call may have cost):

* the provider's usage chunk arrived (``stream_options.include_usage``): its token counts, ``ok``;
* finished without a usage chunk: the reserved bound, ``ok``, ``estimated`` (logged ``usage-missing``);
* the model failed or stalled mid-stream (``error``, ``timeout``), or the caller cut the stream
  short (``cancelled``: the visitor went away; the provider's stream is closed so the model stops):
  the reserved bound, ``estimated``, once the request body went out; nothing (the hold released)
  when it never did or the provider refused it with an HTTP error status.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal
from uuid import UUID

from shared import metering
from shared.db.session import Database
from shared.gateway import keys, offline, provider
from shared.gateway.schemas import ChatMessage, ToolCall
from shared.gateway.service import (
    MIN_COMPLETION_TOKENS,
    BurstPass,
    _admit,
    _Bound,
    _budget_freed,
    _client_request_id,
    _clipped,
    _elapsed_ms,
    _log,
    _measured,
    _provider_messages,
    _unanswered,
    check_chat_arguments,
)
from shared.gateway.tools import accepted_tool_calls, tool_names
from shared.metering import Usage
from shared.pricing import OFFLINE_MODEL, cost_microusd, prompt_token_bound
from shared.retrieval import RetrievedChunk

StreamEnding = Literal["finished", "failed", "cut_short"]

_OFFLINE_PIECE = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True, slots=True)
class StreamedChat:
    """How a streamed call ended, and what it was metered at.

    ``content`` is all the text that was streamed: the whole reply when ``ending`` is ``finished``,
    what came before the end otherwise (clipped to the transcript limit, saying so). ``tool_calls``
    come only from a finished stream (a tool call cut in the middle has no reliable arguments),
    limited to the tools offered. ``estimated``: the cost is the reserved bound, not the provider's
    figures.
    """

    ending: StreamEnding
    content: str
    tool_calls: list[ToolCall]
    outcome: metering.Outcome
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_microusd: int
    usage_event_id: int
    offline: bool
    estimated: bool


class ChatStream:
    """One admitted streamed call; see the module docstring. Made only by ``open_chat_stream``."""

    def __init__(
        self,
        db: Database,
        usage: Usage,
        *,
        reservation_id: UUID,
        config: provider.ProviderConfig | None,
        prompt: list[tuple[provider.ProviderRole, str]],
        bound: _Bound,
        messages: list[ChatMessage],
        knowledge: list[RetrievedChunk],
        tools: list[dict[str, Any]] | None,
        max_tokens: int,
        temperature: float,
    ) -> None:
        self._db = db
        self._usage = usage
        self._reservation_id = reservation_id
        self._config = config
        self._prompt = prompt
        self._bound = bound
        self._messages = messages
        self._knowledge = knowledge
        self._tools = tools
        self._offered = tool_names(tools)
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._received = provider.StreamedCompletion()
        self._failure: provider.ProviderFailure | None = None
        self._started: float | None = None
        self._deltas: AsyncGenerator[str] | None = None
        self._offline_calls: list[ToolCall] = []
        self._finishing: asyncio.Task[StreamedChat] | None = None

    def deltas(self) -> AsyncIterator[str]:
        """The reply's text, piece by piece, as the model writes it. Iterate it at most once."""
        if self._deltas is not None or self._finishing is not None:
            raise RuntimeError("a chat stream is read once, before it is finished")
        self._deltas = self._stream()
        return self._deltas

    async def _stream(self) -> AsyncGenerator[str]:
        self._started = time.perf_counter()
        if self._config is None:
            reply = offline.answer(self._messages, self._knowledge, self._offered)
            for piece in _OFFLINE_PIECE.findall(reply.content):
                await asyncio.sleep(0)  # a piece at a time, as a model would send them
                self._received.content.append(piece)
                yield piece
            self._offline_calls = reply.tool_calls
            self._received.prompt_tokens = reply.prompt_tokens
            self._received.completion_tokens = reply.completion_tokens
            self._received.finished = True
            return
        try:
            async for text in provider.stream_complete(
                self._config,
                model=self._usage.model,
                messages=self._prompt,
                tools=self._tools,
                max_tokens=self._bound.completion_tokens,  # lowered when the budget's room is short
                temperature=self._temperature,
                request_id=self._usage.client_request_id or "",
                into=self._received,
            ):
                yield text
        except provider.ProviderFailure as failure:
            self._failure = failure
            selection = keys.Selection(self._config, self._usage.key_source, self._usage.org_id)
            try:  # an organization's own key refused by its provider is marked broken, as for any call
                await keys.note_failure(self._db, selection, failure, request_id=self._usage.request_id)
            except Exception:  # the words already shown, and the metering in finish(), matter more
                _log(self._usage, "could not note a model key failure", logging.ERROR, "model-key-note-failed")

    async def finish(self) -> StreamedChat:
        """Meter the call and settle its reservation (once), and say how the stream ended.

        Safe to call again and from a cancelled task: the first call starts the metering in a task
        of its own, which runs to its end even if the caller is cancelled meanwhile.
        """
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._meter())
        return await asyncio.shield(self._finishing)

    async def _meter(self) -> StreamedChat:
        if self._deltas is not None:
            # Stops the model if the caller left before the end (closes the provider's stream).
            await self._deltas.aclose()
        received = self._received
        started = self._started if self._started is not None else time.perf_counter()
        usage = replace(self._usage, provider_request_id=received.provider_request_id)
        ending: StreamEnding = (
            "finished" if received.finished else "failed" if self._failure is not None else "cut_short"
        )
        if received.completion_tokens is not None or (received.finished and self._failure is None):
            # Measured (the usage chunk came), or finished without one: the bound, as an estimate.
            measured = _measured(None, received.prompt_tokens, received.completion_tokens, self._bound, usage, None)
            usage = replace(
                usage,
                prompt_tokens=measured.prompt_tokens,
                completion_tokens=measured.completion_tokens,
                cost_microusd=cost_microusd(
                    usage.model, prompt_tokens=measured.prompt_tokens, completion_tokens=measured.completion_tokens
                ),
                latency_ms=_elapsed_ms(started),
                estimated=measured.estimated,
            )
        elif self._failure is not None:
            # Failed before the usage chunk (even after the finish reason: the connection broke).
            usage = _unanswered(
                usage, self._failure.outcome, self._bound, billed=self._failure.may_be_billed, started=started
            )
            _log(
                usage, "model call failed mid-stream", logging.WARNING, self._failure.reason, estimated=usage.estimated
            )
        else:
            usage = _unanswered(usage, "cancelled", self._bound, billed=received.request_sent, started=started)
            _log(
                usage,
                "streamed call cut short by the caller",
                logging.INFO,
                "stream-cut-short",
                estimated=usage.estimated,
            )
        try:
            usage_event_id = await metering.record(self._db, usage, reservation_id=self._reservation_id)
            _budget_freed(usage.org_id)
        except Exception:
            _log(usage, "could not meter a streamed call", logging.ERROR, "stream-metering-failed")
            raise
        content, _ = _clipped(received.text())
        return StreamedChat(
            ending=ending,
            content=content,
            tool_calls=accepted_tool_calls(self._offline_calls or received.calls(), self._offered)
            if ending == "finished"
            else [],
            outcome=usage.outcome,
            model=usage.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cost_microusd=usage.cost_microusd,
            usage_event_id=usage_event_id,
            offline=self._config is None,
            estimated=usage.estimated,
        )


async def open_chat_stream(
    db: Database,
    *,
    org_id: UUID,
    agent_id: UUID | None,
    conversation_id: UUID | None,
    model: str,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None = None,
    knowledge: list[RetrievedChunk] | None = None,
    max_tokens: int = 400,
    temperature: float = 0.3,
    request_id: str,
    burst_per_minute: int | None = None,
    burst_pass: BurstPass | None = None,
) -> ChatStream:
    """Admit a streamed chat call: the burst limit and the reservation, as ``chat`` does; nothing
    is sent to the model until ``deltas()`` is read. Raises as ``chat`` does before its call."""
    check_chat_arguments(messages, max_tokens, model)
    selection = await keys.select(db, org_id)
    config = selection.config
    knowledge = knowledge or []
    prompt = _provider_messages(messages, knowledge)
    usage = Usage(
        org_id=org_id,
        agent_id=agent_id,
        conversation_id=conversation_id,
        kind="chat",
        model=model if config is not None else OFFLINE_MODEL,
        outcome="ok",
        request_id=request_id,
        key_source=selection.source,
    )
    if config is None:
        bound = _Bound(OFFLINE_MODEL, 0, 0, 0)
    else:
        prompt_bound = prompt_token_bound((content for _, content in prompt), messages=len(prompt), tools=tools or ())
        bound = _Bound(model, prompt_bound, max_tokens, min(max_tokens, MIN_COMPLETION_TOKENS))
        usage = replace(usage, client_request_id=_client_request_id())
    reservation = await _admit(db, usage, bound=bound, burst_per_minute=burst_per_minute, burst_pass=burst_pass)
    if reservation.amount_microusd < bound.cost_microusd:
        # As in ``chat``: the budget's room lowers the reply's allowance down to the bound's floor.
        bound = bound.within(reservation.amount_microusd)
        _log(
            usage,
            "the budget's room lowered the reply allowance",
            logging.INFO,
            "completion-lowered",
            reply_allowance=bound.completion_tokens,
        )
    return ChatStream(
        db,
        usage,
        reservation_id=reservation.id,
        config=config,
        prompt=prompt,
        bound=bound,
        messages=messages,
        knowledge=knowledge,
        tools=tools,
        max_tokens=max_tokens,
        temperature=temperature,
    )
