-- Record what the Stripe webhook did with each event.
--
-- Tables: public.stripe_events (new column outcome).
-- Why: the ledger row and the event's effect commit in one transaction, so every row is an event
-- that was handled exactly once; outcome says how: applied, stale (older than the state already
-- held), ignored-event-type, org-unresolved, customer-mismatch, subscription-gone,
-- other-subscription-active or no-subscription. Operators find the events that changed nothing,
-- and why, without reading logs. Written by the server (service_role) only, like the rest of the
-- row; the existing grants and the owners-and-admins read policy cover the new column.

alter table public.stripe_events
  add column outcome text null
  constraint stripe_events_outcome_format check (outcome ~ '^[a-z][a-z-]{0,49}$');

comment on column public.stripe_events.outcome is
  'What the webhook did with the event (applied, stale, ignored-event-type, org-unresolved, ...). '
  'Null only for rows written before this column existed.';
