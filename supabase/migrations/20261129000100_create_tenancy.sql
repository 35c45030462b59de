-- Create the tenancy core: organizations, memberships, organization limits, and the membership
-- helpers every row-level security policy uses.
--
-- Tables: public.organizations, public.memberships, public.organization_limits.
-- Schemas: private (helpers and trigger functions; not exposed through the Data API),
--          secrets (credentials; no privilege at all for anon or authenticated).
-- Why: every tenant row carries org_id, and every policy reads membership through
-- private.user_org_ids() / private.user_admin_org_ids(), written as
-- `org_id = any (array(select private.user_org_ids()))` so the membership lookup runs once per
-- statement (an InitPlan) and the org_id index does the rest.
-- Supabase grants every new object in public to anon and authenticated by default, so each table
-- below revokes everything and grants back only what the dashboard needs.

create extension if not exists vector with schema extensions;

-- pgcrypto is pre-installed in schema extensions on Supabase; install it only where it is missing.
do $$
begin
  if to_regprocedure('extensions.gen_random_bytes(integer)') is null then
    create extension if not exists pgcrypto with schema extensions;
  end if;
end
$$;

create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;
comment on schema private is 'Helper and trigger functions. Not exposed through the Data API.';

create schema if not exists secrets;
revoke all on schema secrets from public;
revoke all on schema secrets from anon, authenticated;
grant usage on schema secrets to service_role;
comment on schema secrets is 'Credentials. Readable by service_role only; never exposed through the Data API.';

-- ---------------------------------------------------------------------------------------------
-- Generic trigger functions.
-- ---------------------------------------------------------------------------------------------
create function private.set_updated_at()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;
revoke execute on function private.set_updated_at() from public;
comment on function private.set_updated_at() is 'BEFORE UPDATE trigger: stamps updated_at.';

-- The API role the current statement runs under, as PostgREST and our two database paths set it
-- (`set_config('role', ..., true)`), also from inside a security definer function, where
-- current_user is the function owner; falls back to the login role when no role was switched to.
create function private.invoking_role()
returns text
language sql
stable
set search_path = ''
as $$
  select coalesce(nullif(current_setting('role', true), 'none'), session_user::text)
$$;
revoke execute on function private.invoking_role() from public;
grant execute on function private.invoking_role() to authenticated, service_role;

-- ---------------------------------------------------------------------------------------------
-- organizations
-- ---------------------------------------------------------------------------------------------
create table public.organizations (
  id uuid primary key default gen_random_uuid(),
  name text not null check (char_length(name) between 1 and 200),
  created_by uuid default auth.uid() references auth.users (id) on delete set null,
  created_at timestamptz not null default now()
);
comment on table public.organizations is
  'A customer business: the tenant. Every tenant row references one and is visible to its members only.';
create index organizations_created_by_idx on public.organizations (created_by);

-- ---------------------------------------------------------------------------------------------
-- memberships
-- ---------------------------------------------------------------------------------------------
create table public.memberships (
  org_id uuid not null references public.organizations (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role text not null default 'member' check (role in ('owner', 'admin', 'member')),
  created_at timestamptz not null default now(),
  primary key (org_id, user_id)
);
comment on table public.memberships is
  'Who belongs to which organization, as owner, admin or member. Source of truth for every policy.';
create index memberships_user_id_idx on public.memberships (user_id);

-- ---------------------------------------------------------------------------------------------
-- Membership helpers (security definer: they read memberships without recursing into its policies).
-- ---------------------------------------------------------------------------------------------
create function private.user_org_ids()
returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
  select m.org_id
    from public.memberships as m
   where m.user_id = (select auth.uid())
$$;
revoke execute on function private.user_org_ids() from public, anon;
grant execute on function private.user_org_ids() to authenticated;
comment on function private.user_org_ids() is
  'Organizations the requesting user (auth.uid()) belongs to. Use as org_id = any (array(select private.user_org_ids())).';

create function private.user_admin_org_ids()
returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
  select m.org_id
    from public.memberships as m
   where m.user_id = (select auth.uid())
     and m.role in ('owner', 'admin')
$$;
revoke execute on function private.user_admin_org_ids() from public, anon;
grant execute on function private.user_admin_org_ids() to authenticated;
comment on function private.user_admin_org_ids() is
  'Organizations where the requesting user is owner or admin.';

-- ---------------------------------------------------------------------------------------------
-- organization_limits
-- ---------------------------------------------------------------------------------------------
create table public.organization_limits (
  org_id uuid primary key references public.organizations (id) on delete cascade,
  plan text not null default 'free',
  monthly_budget_microusd bigint not null default 5000000 check (monthly_budget_microusd >= 0),
  burst_per_minute integer not null default 30 check (burst_per_minute > 0),
  widget_rpm_per_agent integer not null default 60 check (widget_rpm_per_agent > 0),
  widget_rpm_per_visitor integer not null default 10 check (widget_rpm_per_visitor > 0),
  max_scan_pages integer not null default 50 check (max_scan_pages > 0),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
comment on table public.organization_limits is
  'Per-organization plan limits: monthly model budget (micro-dollars), rate limits, scan size. Written by the server.';
create trigger organization_limits_set_updated_at
  before update on public.organization_limits
  for each row execute function private.set_updated_at();

-- ---------------------------------------------------------------------------------------------
-- Triggers: the creator becomes owner; an organization always keeps an owner; only owners touch
-- the owner role.
-- ---------------------------------------------------------------------------------------------
create function private.handle_new_organization()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if new.created_by is not null then
    insert into public.memberships (org_id, user_id, role)
    values (new.id, new.created_by, 'owner')
    on conflict (org_id, user_id) do nothing;
  end if;
  insert into public.organization_limits (org_id)
  values (new.id)
  on conflict (org_id) do nothing;
  return null;
end
$$;
revoke execute on function private.handle_new_organization() from public;

create trigger organizations_after_insert
  after insert on public.organizations
  for each row execute function private.handle_new_organization();

-- Runs as the statement's role: client writes (role authenticated) that grant, change or remove
-- the owner role need the caller to be an owner; server paths are not restricted here.
create function private.guard_membership_change()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_org_id uuid;
  v_touches_owner boolean;
begin
  if current_user <> 'authenticated' then
    if tg_op = 'DELETE' then
      return old;
    end if;
    return new;
  end if;

  if tg_op = 'INSERT' then
    v_org_id := new.org_id;
    v_touches_owner := new.role = 'owner';
  elsif tg_op = 'UPDATE' then
    v_org_id := old.org_id;
    v_touches_owner := new.role = 'owner' or old.role = 'owner';
  else
    v_org_id := old.org_id;
    v_touches_owner := old.role = 'owner';
  end if;

  if v_touches_owner and not exists (
    select 1
      from public.memberships as m
     where m.org_id = v_org_id
       and m.user_id = (select auth.uid())
       and m.role = 'owner'
  ) then
    raise exception 'only an owner can grant, change or remove the owner role' using errcode = '42501';
  end if;

  if tg_op = 'DELETE' then
    return old;
  end if;
  return new;
end
$$;
revoke execute on function private.guard_membership_change() from public;

create trigger memberships_guard_change
  before insert or update or delete on public.memberships
  for each row execute function private.guard_membership_change();

-- An organization that still exists must keep at least one owner. Concurrent demotions serialize
-- on the organization row. Cascading deletes of the organization itself pass (the row is gone).
create function private.ensure_organization_keeps_owner()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if old.role <> 'owner' then
    return null;
  end if;
  if tg_op = 'UPDATE' and new.role = 'owner' and new.org_id = old.org_id then
    return null;
  end if;

  perform 1 from public.organizations as o where o.id = old.org_id for no key update;
  if not found then
    return null;
  end if;

  if not exists (
    select 1 from public.memberships as m where m.org_id = old.org_id and m.role = 'owner'
  ) then
    raise exception 'an organization must keep at least one owner' using errcode = 'HH409';
  end if;
  return null;
end
$$;
revoke execute on function private.ensure_organization_keeps_owner() from public;

create trigger memberships_keep_owner
  after update or delete on public.memberships
  for each row execute function private.ensure_organization_keeps_owner();

-- ---------------------------------------------------------------------------------------------
-- Privileges and policies.
-- ---------------------------------------------------------------------------------------------
alter table public.organizations enable row level security;
revoke all on table public.organizations from anon, authenticated, service_role;
grant select on table public.organizations to authenticated;
grant insert (name) on table public.organizations to authenticated;
grant update (name) on table public.organizations to authenticated;
grant select, insert, update, delete on table public.organizations to service_role;

-- The creator may read the row they just created, so `insert ... returning` works before the
-- membership (written by the AFTER INSERT trigger) is visible to the statement.
create policy "Members can read their organizations"
  on public.organizations for select
  to authenticated
  using (
    id = any (array(select private.user_org_ids()))
    or created_by = (select auth.uid())
  );

create policy "Signed-in users can create organizations they own"
  on public.organizations for insert
  to authenticated
  with check (
    (select auth.uid()) is not null
    and created_by = (select auth.uid())
  );

create policy "Owners and admins can rename their organizations"
  on public.organizations for update
  to authenticated
  using (id = any (array(select private.user_admin_org_ids())))
  with check (id = any (array(select private.user_admin_org_ids())));

alter table public.memberships enable row level security;
revoke all on table public.memberships from anon, authenticated, service_role;
grant select, delete on table public.memberships to authenticated;
grant insert (org_id, user_id, role) on table public.memberships to authenticated;
grant update (role) on table public.memberships to authenticated;
grant select, insert, update, delete on table public.memberships to service_role;

create policy "Members can read their organizations' memberships"
  on public.memberships for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

create policy "Owners and admins can add members"
  on public.memberships for insert
  to authenticated
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can change member roles"
  on public.memberships for update
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())))
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can remove members and members can leave"
  on public.memberships for delete
  to authenticated
  using (
    org_id = any (array(select private.user_admin_org_ids()))
    or user_id = (select auth.uid())
  );

alter table public.organization_limits enable row level security;
revoke all on table public.organization_limits from anon, authenticated, service_role;
grant select on table public.organization_limits to authenticated;
grant select, insert, update on table public.organization_limits to service_role;

create policy "Members can read their organization's limits"
  on public.organization_limits for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));
