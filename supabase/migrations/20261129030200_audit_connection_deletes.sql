-- Audit every connection deletion, whichever path deletes it.
--
-- Tables: public.connections (new AFTER DELETE trigger), public.audit_log (rows written).
-- Why: the security page promises that creating, re-verifying, breaking and deleting a connection
-- each leave an audit-log row. Creation, re-verification and breaking only happen on the server,
-- which writes those rows itself; deletion is also open to owners and admins straight from the
-- dashboard (RLS policy "Owners and admins can delete connections"), where no server code runs.
-- So the row is written here, as security definer (audit_log has no insert grant for
-- authenticated), naming auth.uid() and the API role of the statement. A server path may put its
-- request id in the transaction-local setting `hiredhands.request_id`.
-- Deleting the organization cascades to its connections; those deletions are not audited (the
-- organization's audit log goes with it, and inserting would violate its foreign key).

create function private.audit_connection_delete()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if not exists (select 1 from public.organizations as o where o.id = old.org_id) then
    return null;
  end if;
  insert into public.audit_log (org_id, actor_user_id, actor, action, target_type, target_id, details, request_id)
  values (
    old.org_id,
    auth.uid(),
    private.invoking_role(),
    'connection.deleted',
    'connection',
    old.id::text,
    jsonb_build_object('kind', old.kind, 'name', old.name, 'status', old.status),
    nullif(current_setting('hiredhands.request_id', true), '')
  );
  return null;
end
$$;
revoke execute on function private.audit_connection_delete() from public;
comment on function private.audit_connection_delete() is
  'AFTER DELETE trigger on public.connections: one audit_log row per deleted connection, from any path.';

create trigger connections_audit_delete
  after delete on public.connections
  for each row execute function private.audit_connection_delete();
