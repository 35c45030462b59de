-- Bring your own key: an organization's own OpenAI-compatible API key, and which key paid each call.
--
-- Tables: public.model_keys (new), secrets.model_key_credentials (new),
--         public.usage_events (new column key_source).
-- Why: an organization may have its model calls made with its own key (and, optionally, its own
-- OpenAI-compatible base URL). The key is checked with a live call and sealed by the application
-- (AES-GCM, as connection credentials) into the secrets schema, which only service_role can use;
-- public.model_keys holds what the dashboard may see: base URL, a four-character hint, status and
-- the organization's choice for when its key fails (on_key_failure: 'refuse' the call, or fall
-- back to the 'platform' key). Both tables are written only by the server, which audits every
-- change. usage_events.key_source says which key paid for a call ('platform', 'organization',
-- or 'none' for the offline provider); existing rows were all paid by the platform.

create table public.model_keys (
  org_id uuid primary key references public.organizations (id) on delete cascade,
  -- Binds the sealed key to this configuration (associated data); a new one for every stored key.
  sealed_id uuid not null,
  base_url text null check (base_url is null or char_length(base_url) <= 2000),
  key_hint text not null check (char_length(key_hint) between 1 and 8),
  status text not null default 'active' check (status in ('active', 'broken')),
  status_reason text null,
  broken_at timestamptz null,
  on_key_failure text not null default 'refuse' check (on_key_failure in ('refuse', 'platform')),
  last_verified_at timestamptz not null default now(),
  created_by uuid null references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check ((status = 'broken') = (broken_at is not null))
);
comment on table public.model_keys is
  'An organization''s own model API key: metadata and a hint only (the key is sealed in secrets.model_key_credentials). Server writes only.';
create index model_keys_created_by_idx on public.model_keys (created_by);

create trigger model_keys_set_updated_at
  before update on public.model_keys
  for each row execute function private.set_updated_at();

alter table public.model_keys enable row level security;
revoke all on table public.model_keys from anon, authenticated, service_role;
grant select on table public.model_keys to authenticated;
grant select, insert, update, delete on table public.model_keys to service_role;

create policy "Owners and admins can read their organization's model key settings"
  on public.model_keys for select
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));

create table secrets.model_key_credentials (
  org_id uuid primary key references public.model_keys (org_id) on delete cascade,
  key_id text not null,
  nonce bytea not null check (octet_length(nonce) = 12),
  ciphertext bytea not null,
  created_at timestamptz not null default now()
);
comment on table secrets.model_key_credentials is
  'AES-GCM ciphertext of an organization''s model API key (application-sealed; associated data binds org and sealed_id). service_role only.';

alter table secrets.model_key_credentials enable row level security;
revoke all on table secrets.model_key_credentials from public, anon, authenticated, service_role;
grant select, insert, update, delete on table secrets.model_key_credentials to service_role;

alter table public.usage_events
  add column key_source text not null default 'platform' check (key_source in ('platform', 'organization', 'none'));
comment on column public.usage_events.key_source is
  'Which key paid for the call: the platform''s, the organization''s own (bring your own key), or none (offline provider).';
