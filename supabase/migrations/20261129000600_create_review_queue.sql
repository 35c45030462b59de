-- Create the review queue and its status history.
--
-- Tables: public.review_items, public.review_item_status_history.
-- Why: agents hand work to the team (escalations, drafted replies, captured leads). Members read
-- and work the queue (status, assigned_to); items are created by the server only, always 'open'.
-- The database checks every status transition (SQLSTATE HH409 on an illegal one) and writes a
-- history row for every creation and status change, through any path and by any role. History
-- rows are never updated (HH403); they are deleted only with their review item or organization.

create table public.review_items (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  agent_id uuid null,
  conversation_id uuid null,
  kind text not null check (kind in ('escalation', 'draft', 'lead')),
  title text not null check (char_length(title) between 1 and 500),
  payload jsonb not null default '{}',
  status text not null default 'open' check (status in ('open', 'in_progress', 'resolved', 'dismissed')),
  assigned_to uuid null references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint review_items_id_org_id_key unique (id, org_id),
  constraint review_items_agent_fkey foreign key (agent_id, org_id)
    references public.agents (id, org_id) on delete set null (agent_id),
  constraint review_items_conversation_fkey foreign key (conversation_id, org_id)
    references public.conversations (id, org_id) on delete set null (conversation_id)
);
comment on table public.review_items is
  'Work handed to the team: escalations, drafted replies, captured leads. Status transitions are checked by a trigger.';
create index review_items_org_id_status_created_at_idx on public.review_items (org_id, status, created_at desc);
create index review_items_agent_id_idx on public.review_items (agent_id);
create index review_items_conversation_id_idx on public.review_items (conversation_id);
create index review_items_assigned_to_idx on public.review_items (assigned_to);

create table public.review_item_status_history (
  id bigint generated always as identity primary key,
  org_id uuid not null references public.organizations (id) on delete cascade,
  review_item_id uuid not null,
  from_status text null,
  to_status text not null,
  changed_by uuid null,
  changed_by_role text not null,
  changed_at timestamptz not null default now(),
  created_at timestamptz not null default now(),
  constraint review_item_status_history_item_fkey foreign key (review_item_id, org_id)
    references public.review_items (id, org_id) on delete cascade
);
comment on table public.review_item_status_history is
  'One row per review item creation and status change, written by trigger. changed_by = auth.uid() (null for the server), '
  'changed_by_role = the API role of the statement. Never updated; deleted only with its item or organization.';
create index review_item_status_history_org_id_idx on public.review_item_status_history (org_id);
create index review_item_status_history_item_idx
  on public.review_item_status_history (review_item_id, changed_at);

-- ---------------------------------------------------------------------------------------------
-- Transition rules.
-- ---------------------------------------------------------------------------------------------
create function private.check_review_item_write()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    if new.status <> 'open' then
      raise exception 'review items are created with status open, not %', new.status using errcode = 'HH409';
    end if;
    return new;
  end if;

  if new.status is distinct from old.status and not (
       (old.status = 'open' and new.status in ('in_progress', 'resolved', 'dismissed'))
    or (old.status = 'in_progress' and new.status in ('open', 'resolved', 'dismissed'))
    or (old.status = 'resolved' and new.status = 'open')
    or (old.status = 'dismissed' and new.status = 'open')
  ) then
    raise exception 'illegal review status transition from % to %', old.status, new.status
      using errcode = 'HH409';
  end if;

  if new.assigned_to is not null
     and new.assigned_to is distinct from old.assigned_to
     and not exists (
       select 1 from public.memberships as m where m.org_id = new.org_id and m.user_id = new.assigned_to
     ) then
    raise exception 'review items can only be assigned to members of their organization' using errcode = 'HH409';
  end if;

  new.updated_at := now();
  return new;
end
$$;
revoke execute on function private.check_review_item_write() from public;

create trigger review_items_check_write
  before insert or update on public.review_items
  for each row execute function private.check_review_item_write();

-- ---------------------------------------------------------------------------------------------
-- History: written for every role (security definer), read by members, changed by nobody.
-- ---------------------------------------------------------------------------------------------
create function private.record_review_status_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into public.review_item_status_history
    (org_id, review_item_id, from_status, to_status, changed_by, changed_by_role)
  values (
    new.org_id,
    new.id,
    case when tg_op = 'UPDATE' then old.status end,
    new.status,
    auth.uid(),
    private.invoking_role()
  );
  return null;
end
$$;
revoke execute on function private.record_review_status_change() from public;

create trigger review_items_history_on_insert
  after insert on public.review_items
  for each row execute function private.record_review_status_change();

create trigger review_items_history_on_status_change
  after update of status on public.review_items
  for each row
  when (old.status is distinct from new.status)
  execute function private.record_review_status_change();

create function private.forbid_review_history_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if tg_op = 'DELETE' and tg_level = 'ROW' then
    if not exists (select 1 from public.review_items as r where r.id = old.review_item_id)
       or not exists (select 1 from public.organizations as o where o.id = old.org_id) then
      return old;
    end if;
  end if;
  raise exception 'review status history is append-only' using errcode = 'HH403';
end
$$;
revoke execute on function private.forbid_review_history_change() from public;

create trigger review_item_status_history_append_only
  before update or delete on public.review_item_status_history
  for each row execute function private.forbid_review_history_change();
create trigger review_item_status_history_no_truncate
  before truncate on public.review_item_status_history
  for each statement execute function private.forbid_review_history_change();

-- ---------------------------------------------------------------------------------------------
-- Privileges and policies.
-- ---------------------------------------------------------------------------------------------
alter table public.review_items enable row level security;
revoke all on table public.review_items from anon, authenticated, service_role;
grant select on table public.review_items to authenticated;
grant update (status, assigned_to) on table public.review_items to authenticated;
grant select, insert, update, delete on table public.review_items to service_role;

create policy "Members can read their organization's review items"
  on public.review_items for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

create policy "Members can work their organization's review items"
  on public.review_items for update
  to authenticated
  using (org_id = any (array(select private.user_org_ids())))
  with check (org_id = any (array(select private.user_org_ids())));

alter table public.review_item_status_history enable row level security;
revoke all on table public.review_item_status_history from anon, authenticated, service_role;
revoke all on sequence public.review_item_status_history_id_seq from anon, authenticated, service_role;
grant select on table public.review_item_status_history to authenticated, service_role;

create policy "Members can read their organization's review history"
  on public.review_item_status_history for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));
