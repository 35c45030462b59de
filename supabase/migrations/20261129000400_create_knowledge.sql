-- Create knowledge sources, site scans and knowledge chunks.
--
-- Tables: public.knowledge_sources, public.scans, public.knowledge_chunks.
-- Why: agents answer from the business's own content. A source is a website or a pasted text;
-- a scan is a job in a Postgres queue (claimed with FOR UPDATE SKIP LOCKED, leased with
-- lease_owner/lease_expires_at, progress and skip reasons recorded); chunks carry the text, a
-- generated English tsvector (GIN index) and an optional 1536-dimension embedding (HNSW, cosine).
-- Members read all three; owners and admins manage sources; scans and chunks are written by the
-- server only. Composite foreign keys (x_id, org_id) keep every reference inside one organization.

-- ---------------------------------------------------------------------------------------------
-- knowledge_sources
-- ---------------------------------------------------------------------------------------------
create table public.knowledge_sources (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  agent_id uuid not null,
  kind text not null check (kind in ('website', 'text')),
  url text null check (char_length(url) <= 2048),
  title text null check (char_length(title) <= 500),
  status text not null default 'active',
  last_scanned_at timestamptz null,
  created_at timestamptz not null default now(),
  constraint knowledge_sources_id_org_id_key unique (id, org_id),
  constraint knowledge_sources_agent_fkey foreign key (agent_id, org_id)
    references public.agents (id, org_id) on delete cascade,
  constraint knowledge_sources_website_has_url check (kind <> 'website' or url is not null)
);
comment on table public.knowledge_sources is
  'Where an agent''s knowledge comes from: a website to scan or a pasted text.';
create index knowledge_sources_org_id_idx on public.knowledge_sources (org_id);
create index knowledge_sources_agent_id_idx on public.knowledge_sources (agent_id);

alter table public.knowledge_sources enable row level security;
revoke all on table public.knowledge_sources from anon, authenticated, service_role;
grant select, delete on table public.knowledge_sources to authenticated;
grant insert (org_id, agent_id, kind, url, title) on table public.knowledge_sources to authenticated;
grant update (url, title) on table public.knowledge_sources to authenticated;
grant select, insert, update, delete on table public.knowledge_sources to service_role;

create policy "Members can read their organization's knowledge sources"
  on public.knowledge_sources for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

create policy "Owners and admins can add knowledge sources"
  on public.knowledge_sources for insert
  to authenticated
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can update knowledge sources"
  on public.knowledge_sources for update
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())))
  with check (org_id = any (array(select private.user_admin_org_ids())));

create policy "Owners and admins can delete knowledge sources"
  on public.knowledge_sources for delete
  to authenticated
  using (org_id = any (array(select private.user_admin_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- scans
-- ---------------------------------------------------------------------------------------------
create table public.scans (
  id uuid primary key default gen_random_uuid(),
  org_id uuid not null references public.organizations (id) on delete cascade,
  agent_id uuid not null,
  source_id uuid null,
  start_url text not null check (char_length(start_url) <= 2048),
  page_limit integer not null default 50 check (page_limit > 0),
  status text not null default 'queued'
    check (status in ('queued', 'running', 'completed', 'failed', 'budget_exhausted', 'cancelled')),
  frontier jsonb not null default '[]',
  visited jsonb not null default '[]',
  pages_found integer not null default 0 check (pages_found >= 0),
  pages_fetched integer not null default 0 check (pages_fetched >= 0),
  pages_skipped integer not null default 0 check (pages_skipped >= 0),
  pages_failed integer not null default 0 check (pages_failed >= 0),
  skip_reasons jsonb not null default '{}',
  error text null,
  lease_owner text null,
  lease_expires_at timestamptz null,
  created_by uuid null,
  created_at timestamptz not null default now(),
  started_at timestamptz null,
  finished_at timestamptz null,
  updated_at timestamptz not null default now(),
  constraint scans_agent_fkey foreign key (agent_id, org_id)
    references public.agents (id, org_id) on delete cascade,
  constraint scans_source_fkey foreign key (source_id, org_id)
    references public.knowledge_sources (id, org_id) on delete set null (source_id)
);
comment on table public.scans is
  'Website scan jobs: a queue claimed with FOR UPDATE SKIP LOCKED and leased; progress, skip reasons and errors per job.';
create index scans_org_id_idx on public.scans (org_id);
create index scans_agent_id_idx on public.scans (agent_id);
create index scans_source_id_idx on public.scans (source_id);
create index scans_status_lease_expires_at_idx on public.scans (status, lease_expires_at);

create trigger scans_set_updated_at
  before update on public.scans
  for each row execute function private.set_updated_at();

alter table public.scans enable row level security;
revoke all on table public.scans from anon, authenticated, service_role;
grant select on table public.scans to authenticated;
grant select, insert, update, delete on table public.scans to service_role;

create policy "Members can read their organization's scans"
  on public.scans for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));

-- ---------------------------------------------------------------------------------------------
-- knowledge_chunks
-- ---------------------------------------------------------------------------------------------
create table public.knowledge_chunks (
  id bigint generated always as identity primary key,
  org_id uuid not null references public.organizations (id) on delete cascade,
  agent_id uuid not null,
  source_id uuid null,
  scan_id uuid null,
  url text null,
  title text null,
  content text not null,
  content_hash bytea null,
  tsv tsvector generated always as (to_tsvector('english', coalesce(title, '') || ' ' || content)) stored,
  embedding extensions.vector(1536) null,
  created_at timestamptz not null default now(),
  constraint knowledge_chunks_agent_fkey foreign key (agent_id, org_id)
    references public.agents (id, org_id) on delete cascade,
  constraint knowledge_chunks_source_fkey foreign key (source_id, org_id)
    references public.knowledge_sources (id, org_id) on delete cascade
);
comment on table public.knowledge_chunks is
  'Retrievable passages of an agent''s knowledge: full-text (tsv, GIN) and vector (embedding, HNSW cosine) search.';
create index knowledge_chunks_org_id_idx on public.knowledge_chunks (org_id);
create index knowledge_chunks_agent_id_idx on public.knowledge_chunks (agent_id);
create index knowledge_chunks_source_id_idx on public.knowledge_chunks (source_id);
create index knowledge_chunks_tsv_idx on public.knowledge_chunks using gin (tsv);
create index knowledge_chunks_embedding_idx on public.knowledge_chunks
  using hnsw (embedding extensions.vector_cosine_ops);

alter table public.knowledge_chunks enable row level security;
revoke all on table public.knowledge_chunks from anon, authenticated, service_role;
revoke all on sequence public.knowledge_chunks_id_seq from anon, authenticated, service_role;
grant select on table public.knowledge_chunks to authenticated;
grant select, insert, update, delete on table public.knowledge_chunks to service_role;

create policy "Members can read their organization's knowledge chunks"
  on public.knowledge_chunks for select
  to authenticated
  using (org_id = any (array(select private.user_org_ids())));
