-- Scan work state: pending chunks, a reason for every final status, crash accounting, one active
-- scan per source.
--
-- Tables: private.scan_chunks (new), public.scans (new columns, new index).
-- Why: a scan runs over several worker invocations. The chunks it produces wait in
-- private.scan_chunks, invisible to retrieval, until the scan ends; then one transaction moves them
-- into public.knowledge_chunks and removes the source's previous chunks (a completed scan replaces
-- them all; a scan stopped early replaces only the pages it fetched again), so a rescan that fails
-- never leaves an agent with less knowledge than before. The schema private is not exposed through
-- the Data API, and no client role holds a privilege on the table: only the server writes it.
-- scans.status_reason says why a scan ended (site_exhausted, page_limit, budget_exhausted, ...);
-- scans.max_depth bounds link depth; scans.pages_visited counts the requests page_limit bounds;
-- scans.crash_count counts leases that expired under a worker
-- that never released them, so a scan that kills its worker every time is failed, not retried forever.

-- ---------------------------------------------------------------------------------------------
-- scans: new columns
-- ---------------------------------------------------------------------------------------------
alter table public.scans
  add column max_depth integer not null default 5 check (max_depth between 0 and 20),
  add column status_reason text null check (char_length(status_reason) <= 100),
  add column crash_count integer not null default 0 check (crash_count >= 0),
  add column pages_visited integer not null default 0 check (pages_visited >= 0);

comment on column public.scans.status_reason is
  'Why the scan is in its final status: site_exhausted, page_limit, budget_exhausted, start_url_failed, worker_crashed, ...';
comment on column public.scans.pages_visited is
  'Pages taken from the frontier and requested (stored, skipped after the request, or failed); page_limit bounds it.';
comment on column public.scans.crash_count is
  'Leases that expired while a worker held the scan (a crashed or killed invocation).';

-- At most one queued or running scan per source: a second request is a conflict, not a second crawl.
create unique index scans_one_active_per_source_idx on public.scans (source_id)
  where status in ('queued', 'running');

-- ---------------------------------------------------------------------------------------------
-- private.scan_chunks
-- ---------------------------------------------------------------------------------------------
create table private.scan_chunks (
  id bigint generated always as identity primary key,
  scan_id uuid not null references public.scans (id) on delete cascade,
  org_id uuid not null references public.organizations (id) on delete cascade,
  url text not null check (char_length(url) <= 2048),
  title text null check (char_length(title) <= 500),
  content text not null,
  content_hash bytea not null,
  page_hash bytea not null,
  embedding extensions.vector(1536) null,
  created_at timestamptz not null default now()
);
comment on table private.scan_chunks is
  'Chunks of a scan in progress, published into public.knowledge_chunks in one transaction when the scan ends. Server only.';
create index scan_chunks_org_id_idx on private.scan_chunks (org_id);
create index scan_chunks_scan_id_page_hash_idx on private.scan_chunks (scan_id, page_hash);

-- RLS on with no policy, and no privilege for any client role: only service_role (which bypasses
-- RLS) reads or writes it.
alter table private.scan_chunks enable row level security;
revoke all on table private.scan_chunks from public, anon, authenticated, service_role;
revoke all on sequence private.scan_chunks_id_seq from public, anon, authenticated, service_role;
grant select, insert, delete on table private.scan_chunks to service_role;
