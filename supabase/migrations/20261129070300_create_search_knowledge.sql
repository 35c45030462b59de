-- Hybrid knowledge retrieval as one SQL function: full text and vector neighbours fused by rank.
--
-- Functions: private.search_knowledge (new). Tables read: public.knowledge_chunks.
-- Why: retrieval is part of the data plane's contract, so it lives beside the data it ranks, is
-- planned once per session, and is callable the same way by every server path (the widget, and
-- later the dashboard's "test your agent").
--   * full text: any of the question's stemmed words (plainto_tsquery with its & turned into |)
--     against the generated tsv column (GIN index), ranked by ts_rank, so passages that match more
--     of the words rank first;
--   * vector: cosine distance to the question's embedding (HNSW index), when one is given;
--   * fusion: reciprocal rank fusion, score = sum(1 / (k + rank)) over the lists a chunk is in
--     (k = 60, Cormack et al. 2009), which needs no calibration between a ts_rank and a distance.
-- With no embedding (the offline provider) the nearest list is empty and the score is the same
-- formula over the full-text list alone. Security invoker and executable by service_role only:
-- the agent filter is the tenant wall on the server path, and a chunk's composite foreign key
-- keeps it in its agent's organization.

create function private.search_knowledge(
  p_agent_id uuid,
  p_query text,
  p_embedding extensions.vector(1536),
  p_limit integer,
  p_candidates integer default 40,
  p_k integer default 60
)
returns table (id bigint, url text, title text, content text, score double precision)
language sql
stable
set search_path = ''
as $$
  with q as (
    select pg_catalog.replace(
             pg_catalog.plainto_tsquery('english', p_query)::text, ' & ', ' | '
           )::pg_catalog.tsquery as tsq
  ),
  full_text as (
    select c.id,
           pg_catalog.row_number() over (order by pg_catalog.ts_rank(c.tsv, q.tsq) desc, c.id) as rank
      from public.knowledge_chunks as c, q
     where c.agent_id = p_agent_id
       and c.tsv operator(pg_catalog.@@) q.tsq
     order by rank
     limit p_candidates
  ),
  nearest as (
    select n.id, pg_catalog.row_number() over (order by n.distance, n.id) as rank
      from (
        select c.id, c.embedding operator(extensions.<=>) p_embedding as distance
          from public.knowledge_chunks as c
         where p_embedding is not null
           and c.agent_id = p_agent_id
           and c.embedding is not null
         order by distance
         limit p_candidates
      ) as n
  ),
  fused as (
    select r.id, pg_catalog.sum(1.0 / (p_k + r.rank)) as score
      from (select f.id, f.rank from full_text as f union all select n.id, n.rank from nearest as n) as r
     group by r.id
  )
  select c.id, coalesce(c.url, ''), coalesce(c.title, ''), c.content, f.score::double precision
    from fused as f
    join public.knowledge_chunks as c on c.id = f.id
   order by f.score desc, c.id
   limit p_limit
$$;

comment on function private.search_knowledge(uuid, text, extensions.vector, integer, integer, integer) is
  'An agent''s best knowledge chunks for a question: full text and vector neighbours fused by reciprocal rank.';

revoke execute on function private.search_knowledge(uuid, text, extensions.vector, integer, integer, integer)
  from public, anon, authenticated;
grant execute on function private.search_knowledge(uuid, text, extensions.vector, integer, integer, integer)
  to service_role;
