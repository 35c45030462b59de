-- Reserve what is left when a whole hold does not fit, and say whether waiting can help.
--
-- Functions: private.reserve_budget_within(uuid, bigint, bigint) (new, service_role only);
-- private.reserve_budget(uuid, bigint) (now a wrapper over it, same contract as before).
-- Why: a hold is the worst case of a call, several times what a typical call costs, so a burst of
-- simultaneous calls was refused while most of the budget would have gone unspent. A call can
-- instead take what is left of the budget when that is at least its floor (the caller lowers the
-- call's max_completion_tokens to what the hold pays for), and a call refused only because other
-- calls' holds are still in flight is told so (waiting_helps), so it can wait for them to settle.
-- Holds still never add up past the budget: settled spend stays within it whatever the
-- concurrency. HH402 is raised only when the call cannot fit even once every hold has settled.

create function private.reserve_budget_within(p_org_id uuid, p_amount bigint, p_floor bigint)
returns table (id uuid, amount bigint, waiting_helps boolean)
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
  v_hold bigint;
  v_id uuid;
begin
  if p_org_id is null or p_amount is null or p_floor is null or p_floor <= 0 or p_floor > p_amount then
    raise exception 'a reservation needs an organization and 0 < floor <= amount' using errcode = '22023';
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

  v_hold := least(p_amount, v_budget - v_spent - v_reserved);
  if v_hold < p_floor then
    if v_reserved > 0 and v_spent + p_floor <= v_budget then
      return query select null::uuid, 0::bigint, true;
      return;
    end if;
    raise exception 'monthly budget exhausted' using errcode = 'HH402';
  end if;

  update public.budget_periods as p
     set reserved_microusd = p.reserved_microusd + v_hold
   where p.org_id = p_org_id
     and p.period_start = v_period;

  insert into public.budget_reservations (org_id, period_start, amount_microusd)
  values (p_org_id, v_period, v_hold)
  returning budget_reservations.id into v_id;

  return query select v_id, v_hold, false;
end
$$;
revoke execute on function private.reserve_budget_within(uuid, bigint, bigint) from public, anon, authenticated;
grant execute on function private.reserve_budget_within(uuid, bigint, bigint) to service_role;
comment on function private.reserve_budget_within(uuid, bigint, bigint) is
  'Holds p_amount micro-dollars of this month''s budget, or what is left of it when that is at least p_floor; '
  'returns the reservation id and the amount held. No room now but room once the holds in flight settle: '
  'a row with a null id and waiting_helps. HH402 when the call cannot fit even then; 22023 on bad amounts.';

-- The whole-hold reservation, as before: a null id (no room while other holds are in flight) is a refusal.
create or replace function private.reserve_budget(p_org_id uuid, p_amount bigint)
returns uuid
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  if p_amount is null or p_amount <= 0 then
    raise exception 'a reservation needs an organization and a positive amount' using errcode = '22023';
  end if;
  select r.id into v_id from private.reserve_budget_within(p_org_id, p_amount, p_amount) as r;
  if v_id is null then
    raise exception 'monthly budget exhausted' using errcode = 'HH402';
  end if;
  return v_id;
end
$$;
