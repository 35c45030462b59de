-- Create usage metering and monthly budget accounting.
--
-- Tables: public.usage_events, public.budget_periods, public.budget_reservations.
-- Functions (service_role only): private.reserve_budget(uuid, bigint) -> uuid,
-- private.settle_reservation(uuid, bigint), private.release_reservation(uuid).
-- Why: every model call is metered (one usage_events row: tokens, cost in micro-dollars, outcome,
-- request id), append-only for every role (HH403). Before a call the server reserves its maximum
-- cost against the organization's monthly budget; the reservation is settled with the actual cost
-- or released on failure. All three functions first lock the organization's
-- organization_limits row, so concurrent callers of one organization serialize and can never
-- together exceed the cap (HH402 'monthly budget exhausted'). Reservations still held after ten
-- minutes (a caller that crashed) are released by the next reservation.
-- usage_events has no foreign keys besides org_id on purpose: the ledger outlives the agents,
-- conversations and scans it names (a SET NULL would have to update an append-only row).

-- ---------------------------------------------------------------------------------------------
-- usage_events
-- ---------------------------------------------------------------------------------------------
create table public.usage_events (
  id bigint generated always as identity primary key,
  org_id uuid not null references public.organizations (id) on delete cascade,
  agent_id uuid null,
  conversation_id uuid null,
  scan_id uuid null,
  kind text not null check (kind in ('chat', 'embedding')),
  model text not null,
  prompt_tokens integer not null default 0 check (prompt_tokens >= 0),
  completion_tokens integer not null default 0 check (completion_tokens >= 0),
  cost_microusd bigint not null default 0 check (cost_microusd >= 0),
  latency_ms integer null check (latency_ms >= 0),
  outcome text not null check (outcome in ('ok', 'error', 'timeout', 'rejected')),
  request_id text null,
  created_at timestamptz not null default now()
);
comment on table public.usage_events is
  'One row per model call (metering). Append-only for every role; cost in micro-dollars.';
create index usage_events_org_id_created_at_idx on public.usage_events (org_id, created_at);

create trigger usage_events_append_only
  before update or delete on public.usage_events
  for each row execute function private.forbid_append_only_change();
create trigger usage_events_no_truncate
  before truncate on public.usage_events
  for each statement execute function private.forbid_append_only_change();

alter table public.usage_events enable row level security;
revoke all on table public.usage_events from anon, authenticated, service_role;
revoke all on sequence public.usage_events_id_seq from anon, authenticated, service_role;
grant select on table public.usage_events to authenticated;
grant select, insert on table public.usage_events to service_role;

create policy "Members can read their organization's usage"
  on public.usage_events for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- budget_periods and budget_reservations
-- ---------------------------------------------------------------------------------------------
create table public.budget_periods (
  org_id uuid not null references public.organizations (id) on delete cascade,
  period_start date not null check (extract(day from period_start) = 1),
  spent_microusd bigint not null default 0 check (spent_microusd >= 0),
  reserved_microusd bigint not null default 0 check (reserved_microusd >= 0),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (org_id, period_start)
);
comment on table public.budget_periods is
  'Model spend per organization and calendar month (UTC): settled spend and amounts currently reserved. '
  'Written only by private.reserve_budget / settle_reservation / release_reservation.';

create trigger budget_periods_set_updated_at
  before update on public.budget_periods
  for each row execute function private.set_updated_at();

create table public.budget_reservations (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  period_start date not null,
  amount_microusd bigint not null check (amount_microusd > 0),
  status text not null default 'held' check (status in ('held', 'settled', 'released')),
  actual_microusd bigint null check (actual_microusd >= 0),
  created_at timestamptz not null default now(),
  finished_at timestamptz null,
  constraint budget_reservations_period_fkey foreign key (org_id, period_start)
    references public.budget_periods (org_id, period_start) on delete cascade
);
comment on table public.budget_reservations is
  'A hold on an organization''s monthly budget for one model call: held, then settled (actual cost) or released.';
create index budget_reservations_org_id_status_created_at_idx
  on public.budget_reservations (org_id, status, created_at);
create index budget_reservations_org_id_period_start_idx
  on public.budget_reservations (org_id, period_start);

alter table public.budget_periods enable row level security;
revoke all on table public.budget_periods from anon, authenticated, service_role;
grant select on table public.budget_periods to authenticated, service_role;

create policy "Members can read their organization's budget periods"
  on public.budget_periods for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

alter table public.budget_reservations enable row level security;
revoke all on table public.budget_reservations from anon, authenticated, service_role;
grant select on table public.budget_reservations to authenticated, service_role;

create policy "Members can read their organization's budget reservations"
  on public.budget_reservations for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- Budget functions.
-- ---------------------------------------------------------------------------------------------
create function private.reserve_budget(p_org_id uuid, p_amount bigint)
returns uuid
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_period date := date_trunc('month', now() at time zone 'UTC')::date;
  v_budget bigint;
  v_spent bigint;
  v_reserved bigint;
  v_id uuid;
begin
  if p_org_id is null or p_amount is null or p_amount <= 0 then
    raise exception 'a reservation needs an organization and a positive amount' using errcode = '22023';
  end if;

  -- The per-organization lock: every reserve, settle and release of this organization waits here.
  select l.monthly_budget_microusd into v_budget
    from public.organization_limits as l
   where l.org_id = p_org_id
     for update;
  if not found then
    insert into public.organization_limits (org_id) values (p_org_id) on conflict (org_id) do nothing;
    select l.monthly_budget_microusd into v_budget
      from public.organization_limits as l
     where l.org_id = p_org_id
       for update;
  end if;

  -- Release reservations abandoned by callers that never came back.
  with stale as (
    update public.budget_reservations as r
       set status = 'released', finished_at = now()
     where r.org_id = p_org_id
       and r.status = 'held'
       and r.created_at < now() - interval '10 minutes'
    returning r.period_start, r.amount_microusd
  )
  update public.budget_periods as p
     set reserved_microusd = p.reserved_microusd - s.amount
    from (select period_start, sum(amount_microusd)::bigint as amount from stale group by period_start) as s
   where p.org_id = p_org_id
     and p.period_start = s.period_start;

  insert into public.budget_periods (org_id, period_start)
  values (p_org_id, v_period)
  on conflict (org_id, period_start) do nothing;

  select p.spent_microusd, p.reserved_microusd into v_spent, v_reserved
    from public.budget_periods as p
   where p.org_id = p_org_id
     and p.period_start = v_period
     for update;

  if v_spent + v_reserved + p_amount > v_budget then
    raise exception 'monthly budget exhausted' using errcode = 'HH402';
  end if;

  update public.budget_periods as p
     set reserved_microusd = p.reserved_microusd + p_amount
   where p.org_id = p_org_id
     and p.period_start = v_period;

  insert into public.budget_reservations (org_id, period_start, amount_microusd)
  values (p_org_id, v_period, p_amount)
  returning id into v_id;

  return v_id;
end
$$;
revoke execute on function private.reserve_budget(uuid, bigint) from public, anon, authenticated;
grant execute on function private.reserve_budget(uuid, bigint) to service_role;
comment on function private.reserve_budget(uuid, bigint) is
  'Holds p_amount micro-dollars of this month''s budget; returns the reservation id. '
  'HH402 when spent + reserved + amount would exceed organization_limits.monthly_budget_microusd; 22023 on a bad amount.';

create function private.settle_reservation(p_id uuid, p_actual bigint)
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_org_id uuid;
  v_res public.budget_reservations;
begin
  if p_actual is null or p_actual < 0 then
    raise exception 'the actual cost must be zero or more' using errcode = '22023';
  end if;

  select r.org_id into v_org_id from public.budget_reservations as r where r.id = p_id;
  if not found then
    raise exception 'budget reservation not found' using errcode = 'P0002';
  end if;
  perform 1 from public.organization_limits as l where l.org_id = v_org_id for update;

  select * into v_res from public.budget_reservations as r where r.id = p_id for update;
  if v_res.status = 'settled' then
    return;
  end if;

  update public.budget_reservations as r
     set status = 'settled', actual_microusd = p_actual, finished_at = now()
   where r.id = p_id;

  -- A reservation already released (its caller was presumed crashed) no longer counts as
  -- reserved, but the money was spent: charge it.
  update public.budget_periods as p
     set reserved_microusd = p.reserved_microusd
                             - case when v_res.status = 'held' then v_res.amount_microusd else 0 end,
         spent_microusd = p.spent_microusd + p_actual
   where p.org_id = v_res.org_id
     and p.period_start = v_res.period_start;
end
$$;
revoke execute on function private.settle_reservation(uuid, bigint) from public, anon, authenticated;
grant execute on function private.settle_reservation(uuid, bigint) to service_role;
comment on function private.settle_reservation(uuid, bigint) is
  'Settles a reservation with the actual cost (may exceed the hold): reserved -= hold, spent += actual. '
  'Settling twice is a no-op; settling a released reservation charges the actual cost. P0002 unknown id, 22023 bad amount.';

create function private.release_reservation(p_id uuid)
returns void
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_org_id uuid;
  v_res public.budget_reservations;
begin
  select r.org_id into v_org_id from public.budget_reservations as r where r.id = p_id;
  if not found then
    raise exception 'budget reservation not found' using errcode = 'P0002';
  end if;
  perform 1 from public.organization_limits as l where l.org_id = v_org_id for update;

  select * into v_res from public.budget_reservations as r where r.id = p_id for update;
  if v_res.status <> 'held' then
    return;
  end if;

  update public.budget_reservations as r
     set status = 'released', finished_at = now()
   where r.id = p_id;

  update public.budget_periods as p
     set reserved_microusd = p.reserved_microusd - v_res.amount_microusd
   where p.org_id = v_res.org_id
     and p.period_start = v_res.period_start;
end
$$;
revoke execute on function private.release_reservation(uuid) from public, anon, authenticated;
grant execute on function private.release_reservation(uuid) to service_role;
comment on function private.release_reservation(uuid) is
  'Releases a held reservation (the call failed or was not made). A no-op unless the reservation is held. P0002 unknown id.';
