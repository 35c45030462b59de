-- Mark replies that stopped before the model finished them.
--
-- Tables: public.messages (column added).
-- Why: streamed widget replies reach the visitor piece by piece. When the visitor leaves mid-reply,
-- or the model fails or stalls after it started writing, the words already shown are stored as
-- the reply, and a reviewer reading the transcript must be able to tell such a cut reply from a
-- finished one. The model call's usage row (usage_event_id) says how it ended and what it cost.
-- Existing grants cover the new column (members select; the server inserts).

alter table public.messages
  add column partial boolean not null default false;

comment on column public.messages.partial is
  'The reply stopped before the model finished it (the visitor left, or the model failed mid-reply); content is what was shown.';
