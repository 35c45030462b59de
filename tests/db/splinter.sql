-- Database lints for the migrated schema: a re-implementation of a subset of the Supabase
-- database linter (the dashboard's Security and Performance Advisors), supabase/splinter.
--
-- Written for this repository from splinter's published lint definitions and documentation
-- (https://github.com/supabase/splinter, lints/NNNN_*.sql and docs/NNNN_*.md, read at the
-- revisions current in 2026; splinter is Apache-2.0 licensed). Not a copy: same lint names,
-- levels and conditions, rewritten as one query returning (name, level, detail).
--
-- Lints included (number_name: level):
--   0001 unindexed_foreign_keys: INFO
--   0002 auth_users_exposed: ERROR              0013 rls_disabled_in_public: ERROR
--   0003 auth_rls_initplan: WARN                0014 extension_in_public: WARN
--   0006 multiple_permissive_policies: WARN     0015 rls_references_user_metadata: ERROR
--   0007 policy_exists_rls_disabled: ERROR      0016 materialized_view_in_api: WARN
--   0008 rls_enabled_no_policy: INFO            0023 sensitive_columns_exposed: ERROR
--   0009 duplicate_index: WARN                  0024 rls_policy_always_true: WARN
--   0010 security_definer_view: ERROR           0028 anon_security_definer_function_executable: WARN
--   0011 function_search_path_mutable: WARN     0029 authenticated_security_definer_function_executable: WARN
--
-- Exposed schemas come from the setting pgrst.db_schemas, as on Supabase (where the platform
-- stores it on the authenticator role). Run it as:
--     begin;
--     set local pgrst.db_schemas = 'public,graphql_public';
--     <this query>
--     rollback;
-- When the setting is absent, 'public' is assumed (splinter itself then reports no exposure
-- lints; assuming public is the stricter choice for a test).
-- Differences from splinter, all in the stricter direction:
--   * 0003 also recognises unqualified uid()/jwt()/role()/email() (splinter relies on running
--     with search_path = '' so that the deparsed policy says auth.uid()), and reports a policy
--     with one wrapped and one unwrapped call (splinter only asks whether any call is wrapped).
--   * 0013 reports every table in an exposed schema without RLS, whatever its grants.
--   * 0007 and 0024 look at every non-system schema.
-- 0028/0029 follow splinter's current revision, which looks only at exposed schemas (an earlier
-- revision looked at every user schema; under it the membership helpers in schema private, which
-- policies must be able to call, would be reported as WARN by design).

with
settings as (
  select array(
    select btrim(s)
      from unnest(string_to_array(
             coalesce(nullif(current_setting('pgrst.db_schemas', true), ''), 'public'), ',')) as s
  ) as exposed
),
system_schemas as (
  select unnest(array[
    '_timescaledb_cache', '_timescaledb_catalog', '_timescaledb_config', '_timescaledb_internal',
    'auth', 'cron', 'extensions', 'graphql', 'graphql_public', 'information_schema', 'net', 'pgmq',
    'pgroonga', 'pgsodium', 'pgsodium_masks', 'pgtle', 'pgbouncer', 'pg_catalog', 'pg_toast',
    'realtime', 'repack', 'storage', 'supabase_functions', 'supabase_migrations', 'tiger',
    'topology', 'vault'
  ]) as nspname
),
ext_objects as (
  select d.objid from pg_catalog.pg_depend as d where d.deptype = 'e'
),
rels as (
  select c.oid, c.relname, c.relkind, c.relrowsecurity, c.reloptions, n.nspname,
         n.nspname::text = any (coalesce((select exposed from settings), '{}')) as is_exposed,
         n.nspname in (select nspname from system_schemas) or n.nspname like 'pg\_temp%' as is_system,
         c.oid in (select objid from ext_objects) as is_extension_owned,
         pg_catalog.has_table_privilege('anon', c.oid, 'SELECT') as anon_select,
         pg_catalog.has_table_privilege('authenticated', c.oid, 'SELECT') as authenticated_select
    from pg_catalog.pg_class as c
    join pg_catalog.pg_namespace as n on n.oid = c.relnamespace
   where c.relkind in ('r', 'p', 'v', 'm')
),
pols as (
  select r.nspname, r.relname, r.relrowsecurity, r.is_system, p.polname, p.polpermissive, p.polroles,
         p.polcmd,
         pg_catalog.pg_get_expr(p.polqual, p.polrelid) as qual,
         pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid) as with_check
    from pg_catalog.pg_policy as p
    join rels as r on r.oid = p.polrelid
),
funcs as (
  select p.oid, p.proname, p.prosecdef, p.proconfig, n.nspname,
         n.nspname::text = any (coalesce((select exposed from settings), '{}')) as is_exposed,
         n.nspname in (select nspname from system_schemas) or n.nspname like 'pg\_temp%' as is_system,
         p.oid in (select objid from ext_objects) as is_extension_owned,
         pg_catalog.pg_get_function_identity_arguments(p.oid) as args
    from pg_catalog.pg_proc as p
    join pg_catalog.pg_namespace as n on n.oid = p.pronamespace
)

-- 0002 auth_users_exposed: a view or materialized view in an exposed schema that depends on
-- auth.users and that anon/authenticated can select, unless it is a security-invoker view over
-- an auth.users that has RLS.
select 'auth_users_exposed' as name, 'ERROR' as level,
       format('View/materialized view %I.%I exposes auth.users to anon or authenticated', r.nspname, r.relname) as detail
  from pg_catalog.pg_depend as d
  join pg_catalog.pg_rewrite as rw on rw.oid = d.objid
  join rels as r on r.oid = rw.ev_class
  join pg_catalog.pg_class as au on au.oid = d.refobjid
  join pg_catalog.pg_namespace as aun on aun.oid = au.relnamespace and aun.nspname = 'auth' and au.relname = 'users'
 where d.deptype = 'n'
   and r.is_exposed
   and r.oid <> au.oid
   and (r.anon_select or r.authenticated_select)
   and (
        r.relkind = 'm'
     or (r.relkind = 'v' and not (lower(coalesce(r.reloptions::text, '{}'))::text[]
          && array['security_invoker=1', 'security_invoker=true', 'security_invoker=yes', 'security_invoker=on']))
     or (r.relkind = 'v' and not au.relrowsecurity)
   )
 group by r.nspname, r.relname

union all
-- 0003 auth_rls_initplan: a policy calls auth.uid()/jwt()/role()/email() or current_setting()
-- without wrapping it in a sub-select, so it is evaluated per row instead of once per statement.
select 'auth_rls_initplan', 'WARN',
       format('Policy %s on %I.%I re-evaluates auth.<function>() or current_setting() for each row; wrap it as (select ...)',
              quote_ident(p.polname), p.nspname, p.relname)
  from pols as p
 where p.relrowsecurity
   and not p.is_system
   and exists (
     select 1
       from unnest(array[p.qual, p.with_check]) as e (expr)
      where regexp_replace(lower(e.expr), 'select\s+(auth\.)?(uid|jwt|role|email)\(\)', '', 'g')
              ~ '(^|[^a-z0-9_.])(auth\.)?(uid|jwt|role|email)\(\)'
         or regexp_replace(lower(e.expr), 'select\s+current_setting\(', '', 'g') ~ 'current_setting\('
   )

union all
-- 0006 multiple_permissive_policies: more than one permissive policy for the same table, role
-- and action (each one is evaluated for every row).
select 'multiple_permissive_policies', 'WARN',
       format('Table %I.%I has %s permissive policies for role %s and action %s: %s',
              x.nspname, x.relname, count(*), x.rolname, x.cmd, string_agg(quote_ident(x.polname), ', ' order by x.polname))
  from (
    select p.nspname, p.relname, p.polname, ro.rolname, a.cmd
      from pols as p
      join pg_catalog.pg_roles as ro on ro.oid = any (p.polroles) or p.polroles = array[0::oid]
      cross join lateral unnest(case p.polcmd
                                  when 'r' then array['SELECT']
                                  when 'a' then array['INSERT']
                                  when 'w' then array['UPDATE']
                                  when 'd' then array['DELETE']
                                  else array['SELECT', 'INSERT', 'UPDATE', 'DELETE']
                                end) as a (cmd)
     where p.polpermissive
       and not p.is_system
       and ro.rolname not like 'pg\_%'
       and ro.rolname not like 'supabase%admin'
       and not ro.rolbypassrls
  ) as x
 group by x.nspname, x.relname, x.rolname, x.cmd
having count(*) > 1

union all
-- 0007 policy_exists_rls_disabled: policies were written but RLS is off, so none applies.
select 'policy_exists_rls_disabled', 'ERROR',
       format('Table %I.%I has RLS policies but RLS is not enabled', r.nspname, r.relname)
  from rels as r
 where r.relkind in ('r', 'p')
   and not r.relrowsecurity
   and not r.is_system
   and exists (select 1 from pg_catalog.pg_policy as p where p.polrelid = r.oid)

union all
-- 0001 unindexed_foreign_keys (INFO): a foreign key with no valid index whose leading columns are
-- the key's columns in the key's order (splinter's condition), so a delete or key update on the
-- parent scans the child.
select 'unindexed_foreign_keys', 'INFO',
       format('Foreign key %I on table %I.%I has no covering index', ct.conname, n.nspname, c.relname)
  from pg_catalog.pg_constraint as ct
  join pg_catalog.pg_class as c on c.oid = ct.conrelid
  join pg_catalog.pg_namespace as n on n.oid = c.relnamespace
 where ct.contype = 'f'
   and n.nspname not in (select nspname from system_schemas)
   and c.oid not in (select objid from ext_objects)
   and not exists (
     select 1
       from pg_catalog.pg_index as i
      where i.indrelid = ct.conrelid
        and i.indisvalid
        and i.indpred is null
        and (string_to_array(i.indkey::text, ' ')::smallint[])[1:array_length(ct.conkey, 1)] = ct.conkey
   )

union all
-- 0008 rls_enabled_no_policy (INFO): RLS on and no policy: nobody but a BYPASSRLS role reads it.
select 'rls_enabled_no_policy', 'INFO',
       format('Table %I.%I has RLS enabled and no policy', r.nspname, r.relname)
  from rels as r
 where r.relkind in ('r', 'p')
   and r.relrowsecurity
   and not r.is_system
   and not r.is_extension_owned
   and not exists (select 1 from pg_catalog.pg_policy as p where p.polrelid = r.oid)

union all
-- 0009 duplicate_index: two indexes with the same definition on the same table.
select 'duplicate_index', 'WARN',
       format('Table %I.%I has identical indexes: %s', n.nspname, c.relname,
              string_agg(quote_ident(ic.relname), ', ' order by ic.relname))
  from pg_catalog.pg_index as i
  join pg_catalog.pg_class as c on c.oid = i.indrelid
  join pg_catalog.pg_class as ic on ic.oid = i.indexrelid
  join pg_catalog.pg_namespace as n on n.oid = c.relnamespace
 where n.nspname not in (select nspname from system_schemas)
   and c.oid not in (select objid from ext_objects)
 group by n.nspname, c.relname, c.oid,
          regexp_replace(pg_catalog.pg_get_indexdef(i.indexrelid), '^CREATE (UNIQUE )?INDEX \S+ ', 'CREATE \1INDEX ')
having count(*) > 1

union all
-- 0010 security_definer_view: a view in an exposed schema, selectable by the API roles, that is
-- not security_invoker (it would apply its owner's privileges and RLS, not the caller's).
select 'security_definer_view', 'ERROR',
       format('View %I.%I is defined with the SECURITY DEFINER property', r.nspname, r.relname)
  from rels as r
 where r.relkind = 'v'
   and r.is_exposed
   and not r.is_system
   and not r.is_extension_owned
   and (r.anon_select or r.authenticated_select)
   and not (lower(coalesce(r.reloptions::text, '{}'))::text[]
            && array['security_invoker=1', 'security_invoker=true', 'security_invoker=yes', 'security_invoker=on'])

union all
-- 0011 function_search_path_mutable: a function without a pinned search_path.
select 'function_search_path_mutable', 'WARN',
       format('Function %I.%I(%s) has a role mutable search_path', f.nspname, f.proname, f.args)
  from funcs as f
 where not f.is_system
   and not f.is_extension_owned
   and not exists (
     select 1 from unnest(coalesce(f.proconfig, '{}')) as cfg where cfg like 'search\_path=%'
   )

union all
-- 0013 rls_disabled_in_public: a table in an exposed schema without RLS.
select 'rls_disabled_in_public', 'ERROR',
       format('Table %I.%I is exposed through the API but RLS has not been enabled', r.nspname, r.relname)
  from rels as r
 where r.relkind in ('r', 'p')
   and r.is_exposed
   and not r.is_system
   and not r.relrowsecurity

union all
-- 0014 extension_in_public: an extension installed into schema public.
select 'extension_in_public', 'WARN',
       format('Extension %I is installed in the public schema', e.extname)
  from pg_catalog.pg_extension as e
  join pg_catalog.pg_namespace as n on n.oid = e.extnamespace
 where n.nspname = 'public'

union all
-- 0015 rls_references_user_metadata: a policy trusts user_metadata, which end users can edit.
select 'rls_references_user_metadata', 'ERROR',
       format('Policy %s on %I.%I references user_metadata from the JWT', quote_ident(p.polname), p.nspname, p.relname)
  from pols as p
 where not p.is_system
   and (
        p.qual like '%auth.jwt()%user_metadata%'
     or p.qual like '%jwt()%user_metadata%'
     or p.qual like '%current_setting(%request.jwt.claims%)%user_metadata%'
     or p.with_check like '%jwt()%user_metadata%'
     or p.with_check like '%current_setting(%request.jwt.claims%)%user_metadata%'
   )

union all
-- 0016 materialized_view_in_api: materialized views have no RLS; one in an exposed schema that
-- the API roles can select is readable in full.
select 'materialized_view_in_api', 'WARN',
       format('Materialized view %I.%I is selectable by anon or authenticated over the API', r.nspname, r.relname)
  from rels as r
 where r.relkind = 'm'
   and r.is_exposed
   and not r.is_system
   and not r.is_extension_owned
   and (r.anon_select or r.authenticated_select)

union all
-- 0023 sensitive_columns_exposed: an exposed table without RLS that has a credential- or
-- PII-looking column.
select 'sensitive_columns_exposed', 'ERROR',
       format('Table %I.%I is exposed without RLS and has sensitive column(s): %s', r.nspname, r.relname,
              string_agg(distinct a.attname, ', '))
  from rels as r
  join pg_catalog.pg_attribute as a on a.attrelid = r.oid and a.attnum > 0 and not a.attisdropped
 where r.relkind = 'r'
   and r.is_exposed
   and not r.is_system
   and not r.relrowsecurity
   and (r.anon_select or r.authenticated_select)
   and replace(lower(a.attname), '-', '_') = any (array[
     'password', 'passwd', 'pwd', 'passphrase', 'secret', 'secret_key', 'private_key', 'api_key',
     'apikey', 'auth_key', 'token', 'jwt', 'access_token', 'refresh_token', 'oauth_token',
     'session_token', 'bearer_token', 'auth_code', 'session_id', 'session_key', 'session_secret',
     'recovery_code', 'backup_code', 'verification_code', 'otp', 'two_factor', '2fa_secret',
     '2fa_code', 'ssn', 'social_security', 'social_security_number', 'driver_license',
     'drivers_license', 'license_number', 'passport_number', 'passport_id', 'national_id', 'tax_id',
     'credit_card', 'card_number', 'cvv', 'cvc', 'cvn', 'bank_account', 'account_number',
     'routing_number', 'iban', 'swift_code', 'bic', 'health_record', 'medical_record', 'patient_id',
     'insurance_number', 'health_insurance', 'medical_insurance', 'treatment', 'mac_address',
     'macaddr', 'imei', 'device_uuid', 'pgp_key', 'gpg_key', 'ssh_key', 'certificate',
     'license_key', 'activation_key', 'facial_recognition'
   ])
 group by r.nspname, r.relname

union all
-- 0024 rls_policy_always_true: a permissive policy for anon/authenticated/public whose USING
-- (UPDATE/DELETE/ALL) or WITH CHECK (INSERT/UPDATE/ALL) is always true.
select 'rls_policy_always_true', 'WARN',
       format('Policy %s on %I.%I allows unrestricted %s', quote_ident(x.polname), x.nspname, x.relname, x.cmd)
  from (
    select p.*,
           case p.polcmd when 'r' then 'SELECT' when 'a' then 'INSERT' when 'w' then 'UPDATE'
                         when 'd' then 'DELETE' else 'ALL' end as cmd,
           regexp_replace(lower(coalesce(p.qual, '')), '\s', '', 'g') as nq,
           regexp_replace(lower(coalesce(p.with_check, '')), '\s', '', 'g') as nw
      from pols as p
     where p.relrowsecurity
       and p.polpermissive
       and not p.is_system
       and (p.polroles = array[0::oid]
            or exists (select 1 from unnest(p.polroles) as ro
                        where ro::regrole::text in ('anon', 'authenticated')))
  ) as x
 where (x.cmd in ('UPDATE', 'DELETE', 'ALL') and (x.nq in ('true', '(true)', '1=1', '(1=1)') or x.qual is null))
    or x.nw in ('true', '(true)', '1=1', '(1=1)')
    or (x.with_check is null and x.cmd = 'INSERT')
    or (x.with_check is null and x.cmd in ('UPDATE', 'ALL') and x.nq in ('true', '(true)', '1=1', '(1=1)'))

union all
-- 0028 anon_security_definer_function_executable
select 'anon_security_definer_function_executable', 'WARN',
       format('SECURITY DEFINER function %I.%I(%s) is executable by anon', f.nspname, f.proname, f.args)
  from funcs as f
 where f.prosecdef
   and f.is_exposed
   and not f.is_system
   and pg_catalog.has_function_privilege('anon', f.oid, 'EXECUTE')

union all
-- 0029 authenticated_security_definer_function_executable
select 'authenticated_security_definer_function_executable', 'WARN',
       format('SECURITY DEFINER function %I.%I(%s) is executable by authenticated', f.nspname, f.proname, f.args)
  from funcs as f
 where f.prosecdef
   and f.is_exposed
   and not f.is_system
   and pg_catalog.has_function_privilege('authenticated', f.oid, 'EXECUTE')
