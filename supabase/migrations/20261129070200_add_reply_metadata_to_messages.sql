-- Record on each reply the model call that produced it: model, tokens, latency and its usage row.
--
-- Tables: public.messages (columns added).
-- Why: the security page promises widget transcripts the team can review, and a reviewer reading
-- a reply should see which model wrote it, what it cost in tokens and how long it took, without
-- joining the usage ledger by hand. Visitor messages and replies that no model wrote (a fixed
-- "handed to the team" reply) leave these null. usage_event_id is a plain reference, not a foreign
-- key: usage_events is append-only and keeps no inbound keys (see its migration). Existing grants
-- cover the new columns (members select; the server inserts).

alter table public.messages
  add column model text null check (char_length(model) between 1 and 100),
  add column prompt_tokens integer null check (prompt_tokens >= 0),
  add column completion_tokens integer null check (completion_tokens >= 0),
  add column latency_ms integer null check (latency_ms >= 0),
  add column usage_event_id bigint null;

comment on column public.messages.usage_event_id is
  'The usage_events row of the model call that wrote this reply (no foreign key: usage_events is append-only).';
