-- Create the append-only audit log of security-relevant actions.
--
-- Tables: public.audit_log.
-- Why: owners and admins must be able to see who did what (key rotations, connection changes,
-- membership changes, billing changes). Rows can be inserted, never changed: a trigger rejects
-- UPDATE, DELETE and TRUNCATE from every role, service_role included (SQLSTATE HH403). The one
-- exception is deleting the organization itself, whose ON DELETE CASCADE removes its rows.
-- actor_user_id has no foreign key on purpose: the log outlives the user it names.

create table public.audit_log (
  id bigint generated always as identity primary key,
  org_id uuid not null references public.organizations (id) on delete cascade,
  actor_user_id uuid null,
  actor text not null,
  action text not null check (char_length(action) between 1 and 100),
  target_type text null,
  target_id text null,
  details jsonb not null default '{}',
  request_id text null,
  created_at timestamptz not null default now()
);
comment on table public.audit_log is
  'Append-only log of security-relevant actions per organization. actor is the role or service that acted.';
create index audit_log_org_id_created_at_idx on public.audit_log (org_id, created_at desc);

-- Shared by every append-only table that has an org_id: UPDATE and TRUNCATE always fail; DELETE
-- fails unless the row's organization is already gone (the cascade from deleting it).
create function private.forbid_append_only_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if tg_op = 'DELETE' and tg_level = 'ROW' then
    if not exists (select 1 from public.organizations as o where o.id = old.org_id) then
      return old;
    end if;
  end if;
  raise exception '%.% is append-only', tg_table_schema, tg_table_name using errcode = 'HH403';
end
$$;
revoke execute on function private.forbid_append_only_change() from public;

create trigger audit_log_append_only
  before update or delete on public.audit_log
  for each row execute function private.forbid_append_only_change();
create trigger audit_log_no_truncate
  before truncate on public.audit_log
  for each statement execute function private.forbid_append_only_change();

alter table public.audit_log enable row level security;
revoke all on table public.audit_log from anon, authenticated, service_role;
revoke all on sequence public.audit_log_id_seq from anon, authenticated, service_role;
grant select on table public.audit_log to authenticated;
grant select, insert on table public.audit_log to service_role;

create policy "Owners and admins can read their organization's audit log"
  on public.audit_log for select
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));
