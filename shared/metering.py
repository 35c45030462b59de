"""Metering: one ``usage_events`` row per model call, and the settlement of its reservation.

The row and the settlement are one SQL statement (the settle or release function runs in a CTE the
insert reads from), so they commit together or not at all, in a single round trip:

* a charged call: the reservation is settled to the row's cost (``private.settle_reservation``):
  outcome ``ok`` at the provider's figures, or a call that reached the provider without an answer
  (``timeout``, ``error``, ``cancelled`` with ``estimated``) at the bound it reserved;
* a call the provider cannot have billed (``error``, ``timeout``, ``cancelled``, not estimated):
  the reservation is released and the row costs 0;
* outcome ``rejected``: the budget refused the call, there is no reservation and no cost.

docs/gateway.md has the table of outcomes and what each costs; the database's checks hold the same
rules (an unanswered call is charged only as an estimate, a rejected one never).

``usage_events`` is append-only for every role (a trigger raises HH403 on update or delete).
``record`` runs in its own transaction (``run_as_service``), so the row is committed even when
whatever the caller does next fails.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal
from uuid import UUID

from shared.db.session import Database, run_as_service

Kind = Literal["chat", "embedding"]
Outcome = Literal["ok", "error", "timeout", "cancelled", "rejected"]
# Which key paid: the platform's, the organization's own (bring your own key), none (offline).
KeySource = Literal["platform", "organization", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    org_id: UUID
    kind: Kind
    model: str
    outcome: Outcome
    request_id: str
    agent_id: UUID | None = None
    conversation_id: UUID | None = None
    scan_id: UUID | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_microusd: int = 0
    latency_ms: int | None = None
    estimated: bool = False
    """The cost is the reserved bound, not the provider's figure (no usage came back)."""
    client_request_id: str | None = None
    """The id sent with the call (``X-Client-Request-Id``); ``None`` for a call never sent."""
    provider_request_id: str | None = None
    """The provider's id for the call (its ``x-request-id``), when it answered."""
    key_source: KeySource = "platform"
    """Which key paid for the call."""

    def __post_init__(self) -> None:
        if self.outcome != "ok" and self.cost_microusd != 0 and not self.estimated:
            raise ValueError("a call that did not answer is charged only as an estimate")
        if self.outcome == "rejected" and (self.cost_microusd != 0 or self.estimated):
            raise ValueError("a call the budget refused costs nothing")

    @property
    def charged(self) -> bool:
        """Whether the reservation is settled (to this row's cost) rather than released."""
        return self.outcome == "ok" or self.estimated


_FIELDS = fields(Usage)

_SETTLE_AND_INSERT = """
with settled as (select private.settle_reservation(%(reservation_id)s, %(cost_microusd)s))
insert into public.usage_events
  (org_id, agent_id, conversation_id, scan_id, kind, model, prompt_tokens, completion_tokens,
   cost_microusd, latency_ms, outcome, request_id, estimated, client_request_id, provider_request_id,
   key_source)
select %(org_id)s, %(agent_id)s, %(conversation_id)s, %(scan_id)s, %(kind)s, %(model)s, %(prompt_tokens)s,
       %(completion_tokens)s, %(cost_microusd)s, %(latency_ms)s, %(outcome)s, %(request_id)s,
       %(estimated)s, %(client_request_id)s, %(provider_request_id)s, %(key_source)s
  from settled
returning id
"""

_RELEASE_AND_INSERT = """
with released as (select private.release_reservation(%(reservation_id)s))
insert into public.usage_events
  (org_id, agent_id, conversation_id, scan_id, kind, model, prompt_tokens, completion_tokens,
   cost_microusd, latency_ms, outcome, request_id, estimated, client_request_id, provider_request_id,
   key_source)
select %(org_id)s, %(agent_id)s, %(conversation_id)s, %(scan_id)s, %(kind)s, %(model)s, %(prompt_tokens)s,
       %(completion_tokens)s, %(cost_microusd)s, %(latency_ms)s, %(outcome)s, %(request_id)s,
       %(estimated)s, %(client_request_id)s, %(provider_request_id)s, %(key_source)s
  from released
returning id
"""

_INSERT = """
insert into public.usage_events
  (org_id, agent_id, conversation_id, scan_id, kind, model, prompt_tokens, completion_tokens,
   cost_microusd, latency_ms, outcome, request_id, estimated, client_request_id, provider_request_id,
   key_source)
values (%(org_id)s, %(agent_id)s, %(conversation_id)s, %(scan_id)s, %(kind)s, %(model)s, %(prompt_tokens)s,
        %(completion_tokens)s, %(cost_microusd)s, %(latency_ms)s, %(outcome)s, %(request_id)s,
        %(estimated)s, %(client_request_id)s, %(provider_request_id)s, %(key_source)s)
returning id
"""


async def record(db: Database, usage: Usage, *, reservation_id: UUID | None) -> int:
    """Append ``usage`` and settle (a charged call) or release (any other) its reservation.

    Returns the usage row's id. A call that was refused before it was made has no reservation
    (``reservation_id=None``, outcome ``rejected``).
    """
    # Every field is a scalar: a shallow copy (``asdict`` deep-copies each value).
    params: dict[str, Any] = {field.name: getattr(usage, field.name) for field in _FIELDS}
    params["reservation_id"] = reservation_id
    if reservation_id is None:
        if usage.outcome != "rejected":
            raise ValueError("a call that was made always has a reservation")
        query = _INSERT
    elif usage.outcome == "rejected":
        raise ValueError("a rejected call has no reservation")
    elif usage.charged:
        query = _SETTLE_AND_INSERT
    else:
        query = _RELEASE_AND_INSERT
    rows = await run_as_service(db, query, params)
    if not rows:  # pragma: no cover - an insert ... returning always returns the row
        raise RuntimeError("the usage row was not written")
    usage_event_id: int = rows[0]["id"]
    return usage_event_id
