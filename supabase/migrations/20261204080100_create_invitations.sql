-- Team invitations, and an audit row for every membership change from any path.
--
-- Tables: public.invitations (new), public.memberships (new audit trigger), auth.users (new
-- trigger: a signed-in invitee's pending invitations become memberships), public.audit_log (rows).
-- Why: owners and admins invite teammates by email through the server, which calls Supabase
-- Auth's admin API (invite email for a new user) and records the invitation here. Invitations are
-- written only by the server (no client write grant); owners and admins read their
-- organization's invitations. The membership appears when the invitee signs in: Supabase Auth
-- stamps auth.users.last_sign_in_at, and the trigger below turns the user's pending, unexpired
-- invitations into memberships in that same transaction, whichever client signed them in.
-- Membership changes are also made straight from the dashboard (RLS lets owners and admins add,
-- change and remove members), where no server code runs, so they are audited by a trigger, like
-- connection deletions.

create table public.invitations (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  email text not null check (char_length(email) between 3 and 320 and email = lower(email)),
  role text not null check (role in ('owner', 'admin', 'member')),
  status text not null default 'pending' check (status in ('pending', 'accepted', 'revoked', 'expired')),
  invited_by uuid null references auth.users (id) on delete set null,
  -- The Supabase Auth user the invitation is for; no foreign key: Auth creates the user itself.
  invited_user_id uuid null,
  expires_at timestamptz not null,
  accepted_at timestamptz null,
  revoked_at timestamptz null,
  revoked_by uuid null references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check ((status = 'accepted') = (accepted_at is not null)),
  check ((status = 'revoked') = (revoked_at is not null))
);
comment on table public.invitations is
  'Invitations to join an organization with a role. Written by the server only; pending until the invitee signs in, expires or is revoked.';
create index invitations_org_id_created_at_idx on public.invitations (org_id, created_at desc);
create unique index invitations_one_pending_per_email_idx on public.invitations (org_id, email) where status = 'pending';
create index invitations_pending_user_idx on public.invitations (invited_user_id) where status = 'pending';
create index invitations_invited_by_idx on public.invitations (invited_by);
create index invitations_revoked_by_idx on public.invitations (revoked_by);

create trigger invitations_set_updated_at
  before update on public.invitations
  for each row execute function private.set_updated_at();

alter table public.invitations enable row level security;
revoke all on table public.invitations from anon, authenticated, service_role;
grant select on table public.invitations to authenticated;
grant select, insert, update on table public.invitations to service_role;

create policy "Owners and admins can read their organization's invitations"
  on public.invitations for select
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- Who a Supabase Auth user is, for the server's invite path: an existing user who has signed in
-- before is added at once; anyone else gets Supabase's invite email.
-- ---------------------------------------------------------------------------------------------
create function private.auth_user_by_email(p_email text)
returns table (id uuid, has_signed_in boolean)
language sql
stable
security definer
set search_path = ''
as $$
  select u.id, u.last_sign_in_at is not null
    from auth.users as u
   where lower(u.email) = lower(p_email)
     and u.deleted_at is null
   order by u.created_at
   limit 1
$$;
revoke execute on function private.auth_user_by_email(text) from public, anon, authenticated;
grant execute on function private.auth_user_by_email(text) to service_role;
comment on function private.auth_user_by_email(text) is
  'Server only: the Auth user with this email (case-insensitive) and whether they ever signed in.';

-- ---------------------------------------------------------------------------------------------
-- Sign-in accepts pending invitations.
-- ---------------------------------------------------------------------------------------------
create function private.accept_invitations_on_sign_in()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_invitation public.invitations;
begin
  if new.last_sign_in_at is null then
    return null;
  end if;
  if tg_op = 'UPDATE' and new.last_sign_in_at is not distinct from old.last_sign_in_at then
    return null;
  end if;
  for v_invitation in
    update public.invitations as i
       set status = 'accepted', accepted_at = now()
     where i.invited_user_id = new.id
       and i.status = 'pending'
       and i.expires_at > now()
    returning i.*
  loop
    insert into public.memberships (org_id, user_id, role)
    values (v_invitation.org_id, new.id, v_invitation.role)
    on conflict (org_id, user_id) do nothing;
    insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details)
    values (
      v_invitation.org_id,
      new.id,
      'sign-in',
      'invitation.accepted',
      'invitation',
      v_invitation.id::text,
      jsonb_build_object('email', v_invitation.email, 'role', v_invitation.role)
    );
  end loop;
  return null;
end
$$;
revoke execute on function private.accept_invitations_on_sign_in() from public;
comment on function private.accept_invitations_on_sign_in() is
  'AFTER INSERT/UPDATE OF last_sign_in_at on auth.users: pending, unexpired invitations of the user become memberships.';

create trigger on_auth_user_sign_in_accept_invitations
  after insert or update of last_sign_in_at on auth.users
  for each row execute function private.accept_invitations_on_sign_in();

-- ---------------------------------------------------------------------------------------------
-- Every membership change is audited, whichever path makes it.
-- ---------------------------------------------------------------------------------------------
create function private.audit_membership_change()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_org_id uuid := coalesce(new.org_id, old.org_id);
begin
  if not exists (select 1 from public.organizations as o where o.id = v_org_id) then
    return null;  -- the organization is being deleted; its log goes with it
  end if;
  if tg_op = 'UPDATE' and new.role is not distinct from old.role then
    return null;
  end if;
  insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details, request_id)
  values (
    v_org_id,
    auth.uid(),
    private.invoking_role(),
    case tg_op when 'INSERT' then 'member.added' when 'UPDATE' then 'member.role_changed' else 'member.removed' end,
    'user',
    coalesce(new.user_id, old.user_id)::text,
    case tg_op
      when 'INSERT' then jsonb_build_object('role', new.role)
      when 'UPDATE' then jsonb_build_object('from_role', old.role, 'to_role', new.role)
      else jsonb_build_object('role', old.role)
    end,
    nullif(current_setting('hiredhands.request_id', true), '')
  );
  return null;
end
$$;
revoke execute on function private.audit_membership_change() from public;
comment on function private.audit_membership_change() is
  'AFTER INSERT/UPDATE OF role/DELETE on public.memberships: one audit_log row per change, from any path.';

create trigger memberships_audit_change
  after insert or update of role or delete on public.memberships
  for each row execute function private.audit_membership_change();
