"""Streamed replies: ``POST /api/widget/{key}/chat`` with ``Accept: text/event-stream``.

The contract with the widget (docs/widget.md, "Streamed replies"): every refusal that can happen
before the model is called is the same problem answer as on the JSON path, because
``open_chat_stream`` does all of that work, in the same order as ``service.chat``, before the
response starts: the context read, the origin, the rate limits, the conversation, the knowledge,
and the gateway's burst limit and budget reservation. Then the events, each ``data`` one line of
JSON:

1. ``conversation``: ``conversation_id``, ``visitor_token``, ``visitor_token_expires_at``;
2. ``delta`` (zero or more): ``text``, the next piece of the reply;
3. ``tool`` (zero or more): ``kind`` ``handed_to_team`` or ``lead_captured``, once stored;
4. ``error`` (a failure after the stream started): ``message``, our own friendly line;
5. ``done``: ``status`` ``answered`` or ``handed_to_team``. Every stream ends with it.

``StreamedTurn.close`` runs after every stream (``shared.web.sse``): when the visitor left before
the end, the model call is still metered, and the words already sent are stored as the reply,
marked ``partial``. The settlement (metering, then the transcript) runs once, in a task of its
own, whether the events reach it or ``close`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from shared import gateway, reviews
from shared.connections import outbox
from shared.db.session import Database
from shared.errors import BudgetExhausted, ModelUnavailable, RateLimited
from shared.gateway import WIDGET_TOOLS, ChatStream, StreamedChat
from shared.logs import DECISION_REASON, ORG_ID, REQUEST_ID, log_event
from shared.queues import PRODUCTION as QUEUE
from shared.queues import QueueEnvironment
from shared.web.sse import event
from shared.widget import queries, service, visitor_tokens
from shared.widget.errors import AgentUnavailable, ConversationNotFound
from shared.widget.schemas import ChatRequest

EVENT_STREAM = "text/event-stream"
STORE_FAILED_REPLY = "Sorry, something went wrong on our side and your message was not saved. Please send it again."

ToolKind = Literal["handed_to_team", "lead_captured"]
_TOOL_KIND: dict[str, ToolKind] = {"escalation": "handed_to_team", "lead": "lead_captured"}


def wants_event_stream(accept: str | None) -> bool:
    """Whether ``Accept`` names ``text/event-stream`` (with any parameters, and not ``q=0``)."""
    for media_range in (accept or "").split(","):
        media_type, *parameters = (part.strip().lower() for part in media_range.split(";"))
        if media_type == EVENT_STREAM and not any(
            p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in parameters
        ):
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Settled:
    """What the events after the last delta say, once the turn is metered and stored."""

    status: service.ReplyStatus
    own_text: str = ""
    """Our wording, sent as a delta, when the model wrote no text (it only called a tool)."""
    tools: list[ToolKind] = field(default_factory=list)
    error: str | None = None


class StreamedTurn:
    """One admitted turn: its events, and its settlement. Made only by ``open_chat_stream``."""

    def __init__(
        self,
        db: Database,
        context: queries.ChatContext,
        *,
        origin: str | None,
        conversation_id: UUID,
        visitor_id: str,
        message: str,
        received_at: datetime,
        request_id: str,
        stream: ChatStream | None,
        queue: QueueEnvironment,
    ) -> None:
        self._db = db
        self._context = context
        self._origin = origin
        self._conversation_id = conversation_id
        self._visitor_id = visitor_id
        self._message = message
        self._received_at = received_at
        self._request_id = request_id
        self._stream = stream
        self._queue = queue
        self._settling: asyncio.Task[_Settled] | None = None

    async def events(self) -> AsyncIterator[bytes]:
        # The token names the generation this turn's write will give the conversation (a new one
        # starts at 1, each stored turn adds one). The token comes first, before that write: if
        # another turn of the conversation is stored meanwhile, this token is one generation behind
        # and still accepted; if this turn is not stored, it names a generation still to come.
        context = self._context
        generation = (context.token_generation or 0) + 1 if context.conversation_id is not None else 1
        token, expires_at = visitor_tokens.issue(
            conversation_id=self._conversation_id,
            agent_id=context.agent_id,
            visitor_id=self._visitor_id,
            generation=generation,
        )
        yield event(
            "conversation",
            {
                "conversation_id": str(self._conversation_id),
                "visitor_token": token,
                "visitor_token_expires_at": expires_at,
            },
        )
        if self._stream is not None:
            async for text in self._stream.deltas():
                yield event("delta", {"text": text})
        try:
            settled = await self._settle()
        except Exception:  # logged where it happened; the visitor gets our line, never the error
            settled = _Settled("answered", error=STORE_FAILED_REPLY)
        if settled.own_text:
            yield event("delta", {"text": settled.own_text})
        for kind in settled.tools:
            yield event("tool", {"kind": kind})
        if settled.error is not None:
            yield event("error", {"message": settled.error})
        yield event("done", {"status": settled.status})

    async def close(self) -> None:
        """Settle the turn if the events did not get there (the visitor left); wait for it if they did."""
        await self._settle()

    def _settle(self) -> asyncio.Future[_Settled]:
        if self._settling is None:
            self._settling = asyncio.ensure_future(self._meter_and_store())
        return asyncio.shield(self._settling)

    async def _meter_and_store(self) -> _Settled:
        result = await self._stream.finish() if self._stream is not None else None
        context = self._context
        items: list[reviews.NewReviewItem] = []
        if result is not None and result.ending == "finished":
            items = service.review_items(result.tool_calls, self._request_id, context.org_id)
            written = result.content.strip()
            own_text = "" if written else service.own_reply(items)
            escalated = any(item.kind == "escalation" for item in items)
            # As on the JSON path: a turn handed to the team is stored as the system's reply.
            reply = self._reply(result, written or own_text, role="system" if escalated else "agent")
            settled = _Settled(
                "handed_to_team" if escalated else "answered",
                own_text=own_text,
                tools=[_TOOL_KIND[item.kind] for item in items if item.kind in _TOOL_KIND],
            )
        elif result is not None and result.ending == "cut_short":
            # The visitor left: keep what they were shown, and meter what the model did; nothing to escalate.
            reply = self._reply(result, result.content, partial=True)
            settled = _Settled("answered")
        else:
            # The model failed (before or after its first words): the team takes the turn over.
            _log(self._request_id, context.org_id, "model failed mid-stream; handed to the team", "model-unavailable")
            items = [reviews.escalation(reason="model_unavailable", summary=self._message, draft_reply="")]
            if result is not None and result.content.strip():
                reply = self._reply(result, result.content, partial=True)
            else:
                reply = queries.NewMessage("system", service.MODEL_FAILURE_REPLY, datetime.now(UTC))
            settled = _Settled("handed_to_team", error=service.MODEL_FAILURE_REPLY)

        try:
            stored = await queries.store_turn(
                self._db,
                conversation_id=self._conversation_id,
                org_id=context.org_id,
                agent_id=context.agent_id,
                visitor_id=self._visitor_id,
                origin=self._origin,
                messages=[queries.NewMessage("visitor", self._message, self._received_at), reply],
                items=items,
            )
        except Exception as exc:
            _log(self._request_id, context.org_id, "streamed turn not stored", "stream-store-failed", exc)
            raise
        if stored.messages == 0 or stored.token_generation is None:
            # The conversation changed hands or was closed between the read and the write; nothing
            # was written into it.
            return _Settled("answered", error=ConversationNotFound().detail)
        try:  # committed: now the queue may hear of the deliveries (a lost message is the sweeper's)
            await outbox.announce(self._db, self._queue, stored.item_ids)
        except Exception as exc:
            _log(
                self._request_id,
                context.org_id,
                "deliveries not announced; the sweeper sends them",
                "announce-failed",
                exc,
            )
        return settled

    @staticmethod
    def _reply(
        result: StreamedChat, content: str, *, role: queries.MessageRole = "agent", partial: bool = False
    ) -> queries.NewMessage:
        return queries.NewMessage(
            role,
            content,
            datetime.now(UTC),
            model=result.model,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            usage_event_id=result.usage_event_id,
            partial=partial,
        )


async def open_chat_stream(
    db: Database,
    *,
    key: str,
    origin: str | None,
    token: str | None,
    request: ChatRequest,
    client_address: str,
    request_id: str,
    queue: QueueEnvironment = QUEUE,
) -> service.Served[StreamedTurn]:
    """Admit a streamed turn: everything that may refuse it, as ``service.chat`` does and with the same
    answers, up to the model call's reservation. The model is called when the events are read."""
    admitted = await service.admit_turn(
        db,
        key=key,
        origin=origin,
        token=token,
        request=request,
        client_address=client_address,
        request_id=request_id,
    )
    context = admitted.context
    stream = await _open_model_stream(
        db, context, admitted.conversation_id, request.message, request_id, admitted.burst_pass
    )
    turn = StreamedTurn(
        db,
        context,
        origin=admitted.origin,
        conversation_id=admitted.conversation_id,
        visitor_id=admitted.visitor_id,
        message=request.message,
        received_at=admitted.received_at,
        request_id=request_id,
        stream=stream,
        queue=queue,
    )
    return service.Served(turn, str(context.org_id))


async def _open_model_stream(
    db: Database,
    context: queries.ChatContext,
    conversation_id: UUID,
    message: str,
    request_id: str,
    burst_pass: gateway.BurstPass | None,
) -> ChatStream | None:
    """The admitted model call; ``None`` when the model cannot be used at all (the turn then goes to
    the team, as on the JSON path). Budget and burst refusals are ``AgentUnavailable``, as there."""
    try:
        knowledge = await service.retrieve_knowledge(db, context, message, request_id, burst_pass)
        return await gateway.open_chat_stream(
            db,
            org_id=context.org_id,
            agent_id=context.agent_id,
            conversation_id=conversation_id,
            model=context.model,
            messages=service.model_messages(context, message),
            tools=WIDGET_TOOLS,
            knowledge=knowledge,
            max_tokens=service.REPLY_MAX_TOKENS,
            temperature=context.temperature,
            request_id=request_id,
            burst_per_minute=context.burst_per_minute,
            burst_pass=burst_pass,
        )
    except BudgetExhausted:
        raise AgentUnavailable(service.BUDGET_RETRY_AFTER_SECONDS) from None
    except RateLimited as limited:  # the burst limit, for a call without a pass (Redis was down)
        raise AgentUnavailable(limited.retry_after_seconds) from None
    except ModelUnavailable as failure:  # an unpriced model: refused before anything was reserved
        _log(request_id, context.org_id, "model unavailable; handed to the team", failure.type_slug)
        return None


def _log(request_id: str, org_id: UUID, message: str, reason: str, exc: BaseException | None = None) -> None:
    fields: dict[str, object] = {REQUEST_ID: request_id, ORG_ID: str(org_id), DECISION_REASON: reason}
    if exc is not None:
        fields["error_type"] = type(exc).__name__
    log_event(message, logging.WARNING, **fields)
