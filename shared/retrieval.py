"""Retrieval: the passages of an agent's knowledge that best answer a visitor's question.

Hybrid search in one SQL statement over ``public.knowledge_chunks``:

* full text: any of the question's stemmed words (``plainto_tsquery`` with its ``&`` turned
  into ``|``) against the generated ``tsv`` column (GIN index), ranked by ``ts_rank``, so
  passages matching more of the words rank first. Requiring every word (``websearch_to_tsquery``)
  made "How do returns work?" miss the returns policy because it never says "work";
* vector: cosine distance (``<=>``, HNSW index) to the query's embedding, when there is one;
* the two rankings are fused by reciprocal rank fusion, ``score = sum(1 / (60 + rank))`` over the
  lists a chunk appears in (k = 60, from Cormack et al., 2009). RRF needs no calibration between
  a ``ts_rank`` and a cosine distance, which live on unrelated scales.

Without an embedding (the offline provider, or chunks stored before embeddings existed) the
search is full text alone and the score is the same RRF formula over one list.

The connection is the caller's (``as_service`` for the public widget, which bypasses row-level
security), so the ``agent_id`` filter is the tenant wall here: an agent belongs to exactly one
organization, and a chunk's composite foreign key keeps it in its agent's organization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg.rows import class_row

from shared.db.session import Connection

RRF_K = 60
# Each ranking contributes this many candidates before fusion.
_CANDIDATES_PER_LIST = 40
MAX_LIMIT = 50


@dataclass(frozen=True, slots=True)
class RetrievedChunk:
    id: int
    url: str
    title: str
    content: str
    score: float


_FULL_TEXT = """
with q as (select replace(plainto_tsquery('english', %(query)s)::text, ' & ', ' | ')::tsquery as tsq),
full_text as (
  select c.id, row_number() over (order by ts_rank(c.tsv, q.tsq) desc, c.id) as rank
    from public.knowledge_chunks as c, q
   where c.agent_id = %(agent_id)s
     and c.tsv operator(pg_catalog.@@) q.tsq
   order by rank
   limit %(candidates)s
)
select c.id, coalesce(c.url, '') as url, coalesce(c.title, '') as title, c.content,
       (1.0 / (%(k)s + f.rank))::float8 as score
  from full_text as f
  join public.knowledge_chunks as c on c.id = f.id
 order by score desc, c.id
 limit %(limit)s
"""

_HYBRID = """
with q as (
  select replace(plainto_tsquery('english', %(query)s)::text, ' & ', ' | ')::tsquery as tsq,
         %(embedding)s::text::extensions.vector(1536) as embedding
),
full_text as (
  select c.id, row_number() over (order by ts_rank(c.tsv, q.tsq) desc, c.id) as rank
    from public.knowledge_chunks as c, q
   where c.agent_id = %(agent_id)s
     and c.tsv operator(pg_catalog.@@) q.tsq
   order by rank
   limit %(candidates)s
),
nearest as (
  select n.id, row_number() over (order by n.distance, n.id) as rank
    from (
      select c.id, c.embedding operator(extensions.<=>) q.embedding as distance
        from public.knowledge_chunks as c, q
       where c.agent_id = %(agent_id)s
         and c.embedding is not null
       order by distance
       limit %(candidates)s
    ) as n
),
fused as (
  select id, sum(1.0 / (%(k)s + rank)) as score
    from (select id, rank from full_text union all select id, rank from nearest) as ranked
   group by id
)
select c.id, coalesce(c.url, '') as url, coalesce(c.title, '') as title, c.content, f.score::float8 as score
  from fused as f
  join public.knowledge_chunks as c on c.id = f.id
 order by f.score desc, c.id
 limit %(limit)s
"""


def vector_literal(embedding: list[float]) -> str:
    """pgvector's text form, ``[0.1,0.2,...]``."""
    return "[" + ",".join(repr(float(x)) for x in embedding) + "]"


async def search_knowledge(
    conn: Connection,
    *,
    agent_id: UUID,
    query: str,
    query_embedding: list[float] | None,
    limit: int = 5,
) -> list[RetrievedChunk]:
    """The ``limit`` best chunks of ``agent_id``'s knowledge for ``query``, best first."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    params: dict[str, Any] = {
        "agent_id": agent_id,
        "query": query,
        "k": RRF_K,
        "candidates": max(_CANDIDATES_PER_LIST, limit),
        "limit": limit,
    }
    if query_embedding is None:
        sql = _FULL_TEXT
    else:
        sql = _HYBRID
        params["embedding"] = vector_literal(query_embedding)
    async with conn.cursor(row_factory=class_row(RetrievedChunk)) as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()
