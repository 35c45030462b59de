"""The widget's SQL. Each statement runs in its own transaction in one round trip
(``run_as_service``); docs/widget.md counts them.

All run as ``service_role`` (the widget has no user), so every statement filters by the agent the
key resolved to: that filter is the tenant wall here, with the composite foreign keys keeping
conversations, messages and review items inside the agent's organization.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from shared.db.session import Database, jsonb, run_as_service
from shared.reviews import NewReviewItem, as_records

MessageRole = Literal["visitor", "agent", "system"]


@dataclass(frozen=True, slots=True)
class ConfigRow:
    org_id: UUID
    display_name: str | None
    greeting: str | None
    theme: dict[str, Any]
    allowed_origins: list[str]


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    role: MessageRole
    content: str


@dataclass(frozen=True, slots=True)
class ChatContext:
    """The agent behind a key, its organization's limits and, with a valid token, the conversation."""

    agent_id: UUID
    org_id: UUID
    system_prompt: str
    model: str
    temperature: float
    allowed_origins: list[str]
    rpm_per_agent: int
    rpm_per_visitor: int
    burst_per_minute: int
    conversation_id: UUID | None
    conversation_status: str | None
    message_count: int | None
    has_knowledge: bool
    history: list[HistoryMessage]
    token_generation: int | None = None
    """The generation of the conversation's newest visitor token."""


# Same shape for every key: the unique index on widget_key_hash, then the enabled flag. Unknown,
# rotated-out and disabled keys all end here with no row.
_CONFIG = """
select a.org_id, a.display_name, a.greeting, a.theme, a.allowed_origins
  from public.agents as a
 where a.widget_key_hash = %(key_hash)s
   and a.widget_enabled
"""

# One round trip for everything the chat path reads before it calls a model. The limits' fallbacks
# are the column defaults of organization_limits (a row is created with every organization).
_CHAT_CONTEXT = """
select a.id as agent_id, a.org_id, a.system_prompt, a.model, a.temperature::float8 as temperature,
       a.allowed_origins,
       coalesce(l.widget_rpm_per_agent, 60) as rpm_per_agent,
       coalesce(l.widget_rpm_per_visitor, 10) as rpm_per_visitor,
       coalesce(l.burst_per_minute, 30) as burst_per_minute,
       c.id as conversation_id, c.status as conversation_status, c.message_count, c.token_generation,
       exists (select 1 from public.knowledge_chunks as k where k.agent_id = a.id) as has_knowledge,
       coalesce(h.history, '[]'::jsonb) as history
  from public.agents as a
  left join public.organization_limits as l on l.org_id = a.org_id
  left join public.conversations as c
    on c.id = %(conversation_id)s
   and c.agent_id = a.id
   and c.visitor_id = %(visitor_id)s
  left join lateral (
    select jsonb_agg(jsonb_build_object('role', r.role, 'content', r.content) order by r.created_at, r.id) as history
      from (
        select m.role, m.content, m.created_at, m.id
          from public.messages as m
         where m.conversation_id = c.id
         order by m.created_at desc, m.id desc
         limit %(history_limit)s
      ) as r
  ) as h on true
 where a.widget_key_hash = %(key_hash)s
   and a.widget_enabled
"""

# Used only when Redis is unreachable: the agent's visitor messages in the last window.
_RECENT_VISITOR_MESSAGES = """
select count(*)::int as n
  from public.messages as m
  join public.conversations as c on c.id = m.conversation_id
 where c.agent_id = %(agent_id)s
   and m.role = 'visitor'
   and m.created_at > now() - make_interval(secs => %(window_seconds)s)
"""

# One round trip for everything the chat path writes: the conversation (opened, or marked
# escalated, its token generation raised; never a closed one), the visitor's message and the
# reply, and the review items. An escalation is skipped
# while the conversation already has one pending or in progress, so a visitor repeating "a human
# please" does not fill the queue. Messages and items keep their array order (ordinality).
_STORE_TURN = """
with conversation as (
  insert into public.conversations as c (id, org_id, agent_id, visitor_id, origin, status)
  values (%(conversation_id)s, %(org_id)s, %(agent_id)s, %(visitor_id)s, %(origin)s,
          case when %(escalate)s then 'escalated' else 'open' end)
  on conflict (id) do update
     set status = case when %(escalate)s and c.status = 'open' then 'escalated' else c.status end,
         token_generation = c.token_generation + 1
   where c.agent_id = excluded.agent_id
     and c.org_id = excluded.org_id
     and c.visitor_id = excluded.visitor_id
     and c.status <> 'closed'
  returning c.id, c.org_id, c.token_generation
),
stored as (
  insert into public.messages (org_id, conversation_id, role, content, created_at,
                               model, prompt_tokens, completion_tokens, latency_ms, usage_event_id, partial)
  select v.org_id, v.id, m.role, m.content, m.created_at,
         m.model, m.prompt_tokens, m.completion_tokens,
         (select u.latency_ms from public.usage_events as u where u.id = m.usage_event_id and u.org_id = v.org_id),
         m.usage_event_id, m.partial
    from conversation as v,
         rows from (jsonb_to_recordset(%(messages)s) as (role text, content text, created_at timestamptz,
                    model text, prompt_tokens integer, completion_tokens integer, usage_event_id bigint,
                    partial boolean))
           with ordinality as m(role, content, created_at, model, prompt_tokens, completion_tokens,
                                usage_event_id, partial, n)
   order by m.n
  returning id
),
items as (
  insert into public.review_items (org_id, agent_id, conversation_id, kind, title, payload)
  select v.org_id, %(agent_id)s, v.id, i.kind, i.title, i.payload
    from conversation as v,
         rows from (jsonb_to_recordset(%(items)s) as (kind text, title text, payload jsonb))
           with ordinality as i(kind, title, payload, n)
   where i.kind <> 'escalation'
      or not exists (
        select 1
          from public.review_items as r
         where r.conversation_id = v.id
           and r.kind = 'escalation'
           and r.status in ('pending', 'in_progress')
      )
   order by i.n
  returning id
)
select (select count(*) from stored)::int as messages,
       (select coalesce(array_agg(id), '{}') from items) as item_ids,
       (select v.token_generation from conversation as v) as token_generation
"""


@dataclass(frozen=True, slots=True)
class NewMessage:
    role: MessageRole
    content: str
    created_at: datetime
    # The model call that wrote a reply; its latency is read from that usage row.
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_event_id: int | None = None
    partial: bool = False
    """A streamed reply that stopped before the model finished it (the visitor left, or the model failed)."""


@dataclass(frozen=True, slots=True)
class StoredTurn:
    messages: int
    item_ids: list[UUID]  # review items created (their deliveries are announced once committed)
    token_generation: int | None
    """The generation the next visitor token names (None when nothing was stored)."""

    @property
    def items(self) -> int:
        return len(self.item_ids)


async def widget_config(db: Database, *, key_hash: bytes) -> ConfigRow | None:
    rows = await run_as_service(db, _CONFIG, {"key_hash": key_hash})
    return ConfigRow(**rows[0]) if rows else None


async def chat_context(
    db: Database,
    *,
    key_hash: bytes,
    conversation_id: UUID | None,
    visitor_id: str | None,
    history_limit: int,
) -> ChatContext | None:
    params = {
        "key_hash": key_hash,
        "conversation_id": conversation_id,
        "visitor_id": visitor_id,
        "history_limit": history_limit,
    }
    rows = await run_as_service(db, _CHAT_CONTEXT, params)
    if not rows:
        return None
    row = rows[0]
    history = [HistoryMessage(role=item["role"], content=item["content"]) for item in row.pop("history")]
    return ChatContext(**row, history=history)


async def recent_visitor_messages(db: Database, *, agent_id: UUID, window_seconds: int) -> int:
    rows = await run_as_service(db, _RECENT_VISITOR_MESSAGES, {"agent_id": agent_id, "window_seconds": window_seconds})
    return int(rows[0]["n"]) if rows else 0


async def store_turn(
    db: Database,
    *,
    conversation_id: UUID,
    org_id: UUID,
    agent_id: UUID,
    visitor_id: str,
    origin: str | None,
    messages: list[NewMessage],
    items: list[NewReviewItem],
) -> StoredTurn:
    params = {
        "conversation_id": conversation_id,
        "org_id": org_id,
        "agent_id": agent_id,
        "visitor_id": visitor_id,
        "origin": origin,
        "escalate": any(item.kind == "escalation" for item in items),
        "messages": jsonb(
            [
                {
                    "role": m.role,
                    "content": m.content,
                    "created_at": m.created_at.isoformat(),
                    "model": m.model,
                    "prompt_tokens": m.prompt_tokens,
                    "completion_tokens": m.completion_tokens,
                    "usage_event_id": m.usage_event_id,
                    "partial": m.partial,
                }
                for m in messages
            ]
        ),
        "items": as_records(items),
    }
    rows = await run_as_service(db, _STORE_TURN, params)
    if not rows:  # pragma: no cover - the final select always returns one row
        raise RuntimeError("the turn was not stored")
    row = rows[0]
    return StoredTurn(
        messages=row["messages"], item_ids=list(row["item_ids"]), token_generation=row["token_generation"]
    )
