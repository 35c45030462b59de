-- Create connections, their encrypted credentials, and the delivery outbox.
--
-- Tables: public.connections, secrets.connection_credentials, public.deliveries.
-- Why: review items are delivered to Slack, Discord, GitHub, Notion or a webhook. Connection
-- metadata (with at most a secret hint) is readable by members and managed by owners and admins;
-- it is created only by the server, after it has verified the credentials. The credentials
-- themselves are encrypted by the application (AES-GCM, key id kept for rotation) and stored in
-- schema secrets, on which anon and authenticated hold no privilege at all: a direct select is a
-- permission error, not an empty result. Deliveries are an outbox: one row per (review item,
-- connection), enqueued by a trigger when the item is created, claimed by a worker with
-- FOR UPDATE SKIP LOCKED, retried with next_attempt_at, idempotent via idempotency_key.

create table public.connections (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  kind text not null check (kind in ('slack_webhook', 'discord_webhook', 'github', 'notion', 'webhook')),
  name text not null check (char_length(name) between 1 and 200),
  target jsonb not null default '{}' check (jsonb_typeof(target) = 'object'),
  secret_hint text null check (char_length(secret_hint) <= 16),
  status text not null default 'active' check (status in ('active', 'broken')),
  status_reason text null,
  last_verified_at timestamptz null,
  broken_at timestamptz null,
  deliver_kinds text[] not null default '{escalation,draft,lead}'
    check (deliver_kinds <@ array['escalation', 'draft', 'lead']::text[]),
  created_by uuid null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint connections_id_org_id_key unique (id, org_id)
);
comment on table public.connections is
  'A destination for review items (Slack, Discord, GitHub, Notion, webhook). No secrets here: at most secret_hint; '
  'the credentials live in secrets.connection_credentials.';
create index connections_org_id_idx on public.connections (org_id);

create trigger connections_set_updated_at
  before update on public.connections
  for each row execute function private.set_updated_at();

alter table public.connections enable row level security;
revoke all on table public.connections from anon, authenticated, service_role;
grant select, delete on table public.connections to authenticated;
grant update (name, deliver_kinds) on table public.connections to authenticated;
grant select, insert, update, delete on table public.connections to service_role;

create policy "Members can read their organization's connections"
  on public.connections for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

create policy "Owners and admins can update connections"
  on public.connections for update
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())))
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can delete connections"
  on public.connections for delete
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- secrets.connection_credentials
-- ---------------------------------------------------------------------------------------------
create table secrets.connection_credentials (
  connection_id uuid primary key,
  org_id uuid not null references public.organizations (id) on delete cascade,
  key_id text not null,
  nonce bytea not null,
  ciphertext bytea not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint connection_credentials_connection_fkey foreign key (connection_id, org_id)
    references public.connections (id, org_id) on delete cascade
);
comment on table secrets.connection_credentials is
  'AES-GCM ciphertext of a connection''s credentials (application-side encryption, key_id for rotation). service_role only.';
create index connection_credentials_org_id_idx on secrets.connection_credentials (org_id);

create trigger connection_credentials_set_updated_at
  before update on secrets.connection_credentials
  for each row execute function private.set_updated_at();

-- RLS on with no policy: even a role that were granted the table by mistake would read nothing.
alter table secrets.connection_credentials enable row level security;
revoke all on table secrets.connection_credentials from public, anon, authenticated, service_role;
grant select, insert, update, delete on table secrets.connection_credentials to service_role;

-- ---------------------------------------------------------------------------------------------
-- deliveries
-- ---------------------------------------------------------------------------------------------
create table public.deliveries (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  review_item_id uuid not null,
  connection_id uuid not null,
  status text not null default 'pending'
    check (status in ('pending', 'in_progress', 'delivered', 'failed', 'dead')),
  attempts integer not null default 0 check (attempts >= 0),
  next_attempt_at timestamptz not null default now(),
  lease_expires_at timestamptz null,
  last_error text null,
  external_ref text null,
  idempotency_key uuid not null default gen_random_uuid(),
  created_at timestamptz not null default now(),
  delivered_at timestamptz null,
  constraint deliveries_review_item_id_connection_id_key unique (review_item_id, connection_id),
  constraint deliveries_review_item_fkey foreign key (review_item_id, org_id)
    references public.review_items (id, org_id) on delete cascade,
  constraint deliveries_connection_fkey foreign key (connection_id, org_id)
    references public.connections (id, org_id) on delete cascade
);
comment on table public.deliveries is
  'Outbox: one delivery of a review item to a connection, retried until delivered or dead.';
create index deliveries_status_next_attempt_at_idx on public.deliveries (status, next_attempt_at);
create index deliveries_org_id_idx on public.deliveries (org_id);
create index deliveries_connection_id_idx on public.deliveries (connection_id);

alter table public.deliveries enable row level security;
revoke all on table public.deliveries from anon, authenticated, service_role;
grant select on table public.deliveries to authenticated;
grant select, insert, update, delete on table public.deliveries to service_role;

create policy "Members can read their organization's deliveries"
  on public.deliveries for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- Enqueue: a new review item gets one delivery per active connection that wants its kind.
-- ---------------------------------------------------------------------------------------------
create function private.enqueue_review_item_deliveries()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into public.deliveries (org_id, review_item_id, connection_id)
  select new.org_id, new.id, c.id
    from public.connections as c
   where c.org_id = new.org_id
     and c.status = 'active'
     and new.kind = any (c.deliver_kinds)
  on conflict (review_item_id, connection_id) do nothing;
  return null;
end
$$;
revoke execute on function private.enqueue_review_item_deliveries() from public;

create trigger review_items_enqueue_deliveries
  after insert on public.review_items
  for each row execute function private.enqueue_review_item_deliveries();
