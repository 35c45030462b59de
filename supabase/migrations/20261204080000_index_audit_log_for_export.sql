-- Index the audit log for exports in keyset pages.
--
-- Tables: public.audit_log (new index).
-- Why: an export walks an organization's rows in (created_at, id) order, one page at a time,
-- resuming after the last (created_at, id) it sent. With org_id leading and (created_at, id) after
-- it, each page is one index range scan that starts where the previous page stopped, so the cost
-- of a page does not grow with how far into the log the export is. The existing
-- (org_id, created_at desc) index cannot order ties on created_at by id.

create index audit_log_org_id_created_at_id_idx on public.audit_log (org_id, created_at, id);
