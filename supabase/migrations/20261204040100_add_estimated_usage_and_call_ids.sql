-- Meter what the provider can have billed: estimated charges, a cancelled outcome, and call ids.
--
-- Tables: public.usage_events (columns and checks added).
-- Why: a call that timed out, lost its connection or was cancelled after its request body was
-- sent may still be processed and billed by the provider. Such a call is charged at the bound it
-- reserved, and the row says the cost is an estimate (estimated = true), so reconciliation with
-- the provider's own figures can tell measured from assumed. A cancelled call (the visitor went
-- away, a stream cut short) gets its own outcome. client_request_id is the id sent with the call
-- (X-Client-Request-Id, unique per call) and provider_request_id the id the provider answered with
-- (x-request-id), so a drift can be traced to calls on both sides. The checks keep the ledger
-- honest for every writer: a call that did not answer is charged only as an estimate, and a call
-- refused before it was made is never charged. Rows are append-only; the new columns default so
-- existing rows stay as they were (measured, with no call ids).

alter table public.usage_events
  add column estimated boolean not null default false,
  add column client_request_id text null check (char_length(client_request_id) between 1 and 512),
  add column provider_request_id text null check (char_length(provider_request_id) between 1 and 512);

alter table public.usage_events drop constraint usage_events_outcome_check;
alter table public.usage_events
  add constraint usage_events_outcome_check
    check (outcome in ('ok', 'error', 'timeout', 'cancelled', 'rejected')),
  add constraint usage_events_unanswered_cost_is_estimated_check
    check (outcome = 'ok' or estimated or cost_microusd = 0),
  add constraint usage_events_rejected_is_free_check
    check (outcome <> 'rejected' or (cost_microusd = 0 and not estimated));

comment on column public.usage_events.estimated is
  'The cost is the reserved bound, not the provider''s figure: the call reached the provider and no usage came back.';
comment on column public.usage_events.client_request_id is
  'The id sent with the call as X-Client-Request-Id (unique per call); null for calls never sent.';
comment on column public.usage_events.provider_request_id is
  'The provider''s own id for the call (its x-request-id answer header), when it answered.';
