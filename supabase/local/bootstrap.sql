-- Supabase-compatible bootstrap for the local stack and the test databases.
--
-- Applied once per database, as the superuser `postgres`, BEFORE supabase/migrations/.
-- Never applied to a hosted Supabase project: there the platform has already created all of this.
-- Safe to run twice (roles are cluster-wide and may already exist; everything else is guarded).
--
-- Where each piece comes from (read from the upstream sources, reproduced as a faithful subset):
--   * roles anon / authenticated / service_role / authenticator, their attributes, memberships and
--     statement timeouts: supabase/postgres migrations/db/init-scripts/00000000000000-initial-schema.sql,
--     with the later platform migrations applied to the end state (anon/authenticated/service_role
--     made INHERIT in 20230529180330_alter_api_roles_for_inherit; authenticator's supabase_admin
--     membership dropped in 20221103090837; authenticator timeouts 8s).
--   * grants on schema public and its default privileges (every new table, function and sequence in
--     public is granted to anon, authenticated and service_role -- this is why every migration
--     revokes per object): same init script; asserted by supabase/postgres migrations/tests/database/privs.sql.
--   * schema extensions with pgcrypto (and vector): same init script ("Extension namespacing").
--   * schema auth, auth.users and auth.uid()/auth.role()/auth.email(): supabase/postgres
--     init-scripts/00000000000001-auth-schema.sql and supabase/auth (GoTrue) migrations
--     00_init_auth_schema, 20220224000811_update_auth_functions, 20220531120530_add_auth_jwt_function
--     (the functions are `language sql stable`, no SET clause, so the planner can inline them),
--     20221130112646_add_deleted_at, 20240214120130_add_is_anonymous_column,
--     20240612123726_enable_rls_update_grants (RLS on, no grants for the API roles).
--   * the per-request settings these functions read (`request.jwt.claims`, role switch with
--     set_config('role', ..., true)) are those PostgREST sets in its request transaction.
--
-- Local differences, all deliberate:
--   * the auth schema and auth.users are owned by postgres (hosted: supabase_admin /
--     supabase_auth_admin); no other GoTrue tables (identities, refresh tokens, ...) exist locally.
--   * authenticator has no password (local socket / trust auth only).
--   * the embedded PostgreSQL ships only plpgsql and vector. When pgcrypto is unavailable,
--     extensions.gen_random_bytes(integer) is provided by a small SQL function with the same
--     signature, drawing from the server's CSPRNG through gen_random_uuid() (pg_strong_random):
--     12 fully random bytes per UUIDv4 (the version and variant bytes are skipped).

set client_min_messages = warning;

-- ---------------------------------------------------------------------------------------------
-- Roles (cluster-wide: create only when missing, then converge attributes).
-- ---------------------------------------------------------------------------------------------
do $$
begin
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'anon') then
    create role anon nologin inherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticated') then
    create role authenticated nologin inherit;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'service_role') then
    create role service_role nologin inherit bypassrls;
  end if;
  if not exists (select 1 from pg_catalog.pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
end
$$;

alter role anon nologin inherit nobypassrls;
alter role authenticated nologin inherit nobypassrls;
alter role service_role nologin inherit bypassrls;
alter role authenticator login noinherit nobypassrls nosuperuser nocreatedb nocreaterole;

alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role authenticator set statement_timeout = '8s';
alter role authenticator set lock_timeout = '8s';

-- authenticator can only switch into the API roles (NOINHERIT: it holds none of their privileges).
grant anon to authenticator;
grant authenticated to authenticator;
grant service_role to authenticator;

-- ---------------------------------------------------------------------------------------------
-- Schema extensions.
-- ---------------------------------------------------------------------------------------------
create schema if not exists extensions;
grant usage on schema extensions to postgres, anon, authenticated, service_role;

create extension if not exists vector with schema extensions;

do $$
begin
  if exists (select 1 from pg_catalog.pg_available_extensions where name = 'pgcrypto') then
    create extension if not exists pgcrypto with schema extensions;
  elsif to_regprocedure('extensions.gen_random_bytes(integer)') is null then
    create function extensions.gen_random_bytes(integer)
    returns bytea
    language sql
    volatile
    strict
    parallel safe
    set search_path = ''
    as $fn$
      select substring(string_agg(substring(r.b, 1, 6) || substring(r.b, 11, 6), ''::bytea), 1, $1)
        from (select uuid_send(gen_random_uuid()) as b
                from generate_series(1, ($1 + 11) / 12)) as r
    $fn$;
    comment on function extensions.gen_random_bytes(integer) is
      'Local stand-in for pgcrypto.gen_random_bytes (pgcrypto is not shipped by the embedded server): '
      'bytes from pg_strong_random via gen_random_uuid(). Hosted Supabase has pgcrypto installed here.';
  end if;
end
$$;

-- ---------------------------------------------------------------------------------------------
-- Schema public: Supabase's grants and default privileges.
-- ---------------------------------------------------------------------------------------------
grant usage on schema public to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to postgres, anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to postgres, anon, authenticated, service_role;

-- ---------------------------------------------------------------------------------------------
-- Schema auth: users and the claim helpers.
-- ---------------------------------------------------------------------------------------------
create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;

create table if not exists auth.users (
  instance_id uuid null,
  id uuid not null,
  aud varchar(255) null,
  role varchar(255) null,
  email varchar(255) null,
  encrypted_password varchar(255) null,
  email_confirmed_at timestamptz null,
  invited_at timestamptz null,
  confirmation_token varchar(255) null,
  confirmation_sent_at timestamptz null,
  recovery_token varchar(255) null,
  recovery_sent_at timestamptz null,
  email_change_token_new varchar(255) null,
  email_change varchar(255) null,
  email_change_sent_at timestamptz null,
  last_sign_in_at timestamptz null,
  raw_app_meta_data jsonb null,
  raw_user_meta_data jsonb null,
  is_super_admin bool null,
  created_at timestamptz null,
  updated_at timestamptz null,
  phone text null default null,
  phone_confirmed_at timestamptz null,
  phone_change text null default '',
  phone_change_token varchar(255) null default '',
  phone_change_sent_at timestamptz null,
  confirmed_at timestamptz generated always as (least(email_confirmed_at, phone_confirmed_at)) stored,
  email_change_token_current varchar(255) null default '',
  email_change_confirm_status smallint null default 0,
  banned_until timestamptz null,
  reauthentication_token varchar(255) null default '',
  reauthentication_sent_at timestamptz null,
  is_sso_user boolean not null default false,
  deleted_at timestamptz null,
  is_anonymous boolean not null default false,
  constraint users_pkey primary key (id),
  constraint users_phone_key unique (phone),
  constraint users_email_change_confirm_status_check
    check (email_change_confirm_status >= 0 and email_change_confirm_status <= 2)
);
create unique index if not exists users_email_partial_key on auth.users (email) where (is_sso_user = false);
create index if not exists users_instance_id_idx on auth.users (instance_id);
create index if not exists users_is_anonymous_idx on auth.users (is_anonymous);
comment on table auth.users is 'Auth: Stores user login data within a secure schema.';

alter table auth.users enable row level security;
revoke all on table auth.users from anon, authenticated, service_role;

create or replace function auth.uid()
returns uuid
language sql stable
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim.sub', true), ''),
      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;

create or replace function auth.role()
returns text
language sql stable
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim.role', true), ''),
      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
    )::text
$$;

create or replace function auth.email()
returns text
language sql stable
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim.email', true), ''),
      (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
    )::text
$$;

create or replace function auth.jwt()
returns jsonb
language sql stable
as $$
  select
    coalesce(
      nullif(current_setting('request.jwt.claim', true), ''),
      nullif(current_setting('request.jwt.claims', true), '')
    )::jsonb
$$;

comment on function auth.uid() is 'Deprecated. Use auth.jwt() -> ''sub'' instead.';
comment on function auth.role() is 'Deprecated. Use auth.jwt() -> ''role'' instead.';
comment on function auth.email() is 'Deprecated. Use auth.jwt() -> ''email'' instead.';

reset client_min_messages;
