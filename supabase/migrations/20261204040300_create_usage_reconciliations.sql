-- Compare what we metered with what the model provider reports, per day and model.
--
-- Tables: private.usage_reconciliations (new); public.usage_events (index added).
-- Why: metering is only as true as its figures. A scheduled job sums usage_events per UTC day and
-- model and compares the tokens and cost with the provider's own organization usage and costs
-- figures; each run appends one row per source, day and model it checked, and a drift above the
-- threshold is flagged in the log and on /api/health/metering. The job reads usage_events and never
-- changes them (they are append-only; a correction would be a new row). The source column names
-- whose figures were compared: the platform's provider organization today, one per organization
-- key once organizations can bring their own. The table is operational (platform-wide, not one
-- organization's), so it lives in private, with no privilege for any client role. The created_at
-- index serves the job's per-day sums, which cover every organization.

create table private.usage_reconciliations (
  id bigint generated always as identity primary key,
  run_id uuid not null,
  source text not null check (char_length(source) between 1 and 200),
  day date not null,
  model text not null check (char_length(model) between 1 and 100),
  metered_requests bigint not null default 0 check (metered_requests >= 0),
  metered_input_tokens bigint not null default 0 check (metered_input_tokens >= 0),
  metered_output_tokens bigint not null default 0 check (metered_output_tokens >= 0),
  metered_cost_microusd bigint not null default 0 check (metered_cost_microusd >= 0),
  estimated_cost_microusd bigint not null default 0 check (estimated_cost_microusd >= 0),
  provider_requests bigint null check (provider_requests >= 0),
  provider_input_tokens bigint null check (provider_input_tokens >= 0),
  provider_output_tokens bigint null check (provider_output_tokens >= 0),
  provider_cost_microusd bigint null check (provider_cost_microusd >= 0),
  token_drift double precision null,
  cost_drift double precision null,
  status text not null check (status in ('agree', 'drift', 'missing')),
  checked_at timestamptz not null default now(),
  unique (run_id, source, day, model)
);
comment on table private.usage_reconciliations is
  'Per run, source, UTC day and model: metered tokens and cost against the provider''s own figures. '
  'drift = (metered - provider) / provider; status drift past the threshold, missing when the provider has no figures.';
create index usage_reconciliations_source_day_checked_at_idx
  on private.usage_reconciliations (source, day, model, checked_at desc);
create index usage_reconciliations_checked_at_idx on private.usage_reconciliations (checked_at);

alter table private.usage_reconciliations enable row level security;
revoke all on table private.usage_reconciliations from public, anon, authenticated, service_role;
revoke all on sequence private.usage_reconciliations_id_seq from public, anon, authenticated, service_role;
grant select, insert on table private.usage_reconciliations to service_role;

create index usage_events_created_at_idx on public.usage_events (created_at);

-- One row per run, so a run that found nothing to compare still shows the job is alive.
create table private.usage_reconciliation_runs (
  id uuid primary key,
  source text not null check (char_length(source) between 1 and 200),
  first_day date not null,
  last_day date not null check (last_day >= first_day),
  checked integer not null check (checked >= 0),
  drifting integer not null check (drifting >= 0),
  finished_at timestamptz not null default now()
);
comment on table private.usage_reconciliation_runs is
  'One row per reconciliation run and source: the days it covered and how many day-model results drifted.';
create index usage_reconciliation_runs_finished_at_idx on private.usage_reconciliation_runs (finished_at);

alter table private.usage_reconciliation_runs enable row level security;
revoke all on table private.usage_reconciliation_runs from public, anon, authenticated, service_role;
grant select, insert on table private.usage_reconciliation_runs to service_role;
