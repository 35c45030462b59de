-- Create agents and widget key rotation.
--
-- Tables: public.agents. Functions: public.rotate_widget_key(uuid) (Data API entry point,
-- security invoker), private.rotate_widget_key(uuid) (security definer, does the work).
-- Why: an agent is what a customer embeds on their site. The widget key is stored only as its
-- SHA-256 hash (plus the last four characters as a hint); the plaintext is returned once, at
-- rotation. Members read agents; owners and admins manage them; the key columns are writable by
-- no client (column grants), only through the rotation function.
-- unique (id, org_id) lets child tables use composite foreign keys, so a row can never point at
-- another organization's agent.

create table public.agents (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  name text not null check (char_length(name) between 1 and 200),
  display_name text null check (char_length(display_name) <= 200),
  greeting text null check (char_length(greeting) <= 2000),
  theme jsonb not null default '{}' check (jsonb_typeof(theme) = 'object'),
  system_prompt text not null default '' check (char_length(system_prompt) <= 20000),
  model text not null default 'gpt-4o-mini' check (char_length(model) between 1 and 100),
  temperature numeric(3, 2) not null default 0.3 check (temperature between 0 and 2),
  widget_enabled boolean not null default false,
  widget_key_hash bytea unique check (octet_length(widget_key_hash) = 32),
  widget_key_hint text null check (char_length(widget_key_hint) <= 8),
  widget_key_rotated_at timestamptz null,
  allowed_origins text[] not null default '{}' check (cardinality(allowed_origins) <= 50),
  escalation_email text null check (char_length(escalation_email) <= 320),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint agents_id_org_id_key unique (id, org_id)
);
comment on table public.agents is
  'A chat agent an organization embeds through the widget. widget_key_hash = sha256(plaintext key); the plaintext is never stored.';
create index agents_org_id_idx on public.agents (org_id);

create trigger agents_set_updated_at
  before update on public.agents
  for each row execute function private.set_updated_at();

alter table public.agents enable row level security;
revoke all on table public.agents from anon, authenticated, service_role;
grant select, delete on table public.agents to authenticated;
grant insert (
  org_id, name, display_name, greeting, theme, system_prompt, model, temperature,
  widget_enabled, allowed_origins, escalation_email
) on table public.agents to authenticated;
grant update (
  name, display_name, greeting, theme, system_prompt, model, temperature,
  widget_enabled, allowed_origins, escalation_email
) on table public.agents to authenticated;
grant select, insert, update, delete on table public.agents to service_role;

create policy "Members can read their organization's agents"
  on public.agents for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

create policy "Owners and admins can create agents"
  on public.agents for insert
  to authenticated
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can update agents"
  on public.agents for update
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())))
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can delete agents"
  on public.agents for delete
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- Widget key rotation.
-- ---------------------------------------------------------------------------------------------
create function private.rotate_widget_key(p_agent_id uuid)
returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_role text := private.invoking_role();
  v_org_id uuid;
  v_key text;
begin
  select a.org_id into v_org_id
    from public.agents as a
   where a.id = p_agent_id
     for update;

  if v_role = 'service_role' then
    if v_org_id is null then
      raise exception 'agent not found' using errcode = 'P0002';
    end if;
  elsif v_org_id is null or not exists (
    select 1
      from public.memberships as m
     where m.org_id = v_org_id
       and m.user_id = (select auth.uid())
       and m.role in ('owner', 'admin')
  ) then
    -- same answer for "no such agent" and "not yours": nothing to enumerate
    raise exception 'not allowed to rotate this widget key' using errcode = '42501';
  end if;

  v_key := 'hh_wk_' || encode(extensions.gen_random_bytes(24), 'hex');

  update public.agents
     set widget_key_hash = sha256(convert_to(v_key, 'UTF8')),
         widget_key_hint = right(v_key, 4),
         widget_key_rotated_at = now()
   where id = p_agent_id;

  insert into public.audit_log
    (org_id, actor_user_id, actor, action, target_type, target_id, details, request_id)
  values (v_org_id, auth.uid(), v_role, 'agent.widget_key_rotated', 'agent', p_agent_id::text,
          jsonb_build_object('widget_key_hint', right(v_key, 4)),
          nullif(current_setting('hiredhands.request_id', true), ''));

  return v_key;
end
$$;
revoke execute on function private.rotate_widget_key(uuid) from public, anon;
grant execute on function private.rotate_widget_key(uuid) to authenticated, service_role;
comment on function private.rotate_widget_key(uuid) is
  'Replaces an agent''s widget key (192 random bits) and returns the plaintext once; the old key stops working at once. '
  'Callers: owners/admins of the agent''s organization, or service_role. Errors: 42501 (not allowed or no such agent), '
  'P0002 (service_role: no such agent).';

create function public.rotate_widget_key(p_agent_id uuid)
returns text
language sql
volatile
security invoker
set search_path = ''
as $$
  select private.rotate_widget_key(p_agent_id)
$$;
revoke execute on function public.rotate_widget_key(uuid) from public, anon, authenticated, service_role;
grant execute on function public.rotate_widget_key(uuid) to authenticated, service_role;
comment on function public.rotate_widget_key(uuid) is
  'Data API entry point for widget key rotation (security invoker); see private.rotate_widget_key.';
