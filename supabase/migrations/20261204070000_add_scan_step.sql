-- Scans advance in steps, one queue message per step (docs/scans.md, "The worker").
-- Tables touched: public.scans.
-- Why: a message names the step it asks for; a duplicate or late message names a step that has
-- already been taken and is dropped, so only one chain of step messages ever drives a scan.

alter table public.scans
  add column step integer not null default 0 check (step >= 0);

comment on column public.scans.step is
  'Steps taken so far; the next step message names this number, and taking a step increments it.';
