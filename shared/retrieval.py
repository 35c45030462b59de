"""Retrieval: the passages of an agent's knowledge that best answer a visitor's question.

The ranking is one SQL function, ``private.search_knowledge`` (migration
``20261129070300_create_search_knowledge.sql``): any of the question's stemmed words against the
generated ``tsv`` column, ranked by ``ts_rank`` (requiring every word made "How do returns work?"
miss a returns policy that never says "work"), and, when there is an embedding, the cosine
neighbours (HNSW), fused by reciprocal rank (``sum(1 / (60 + rank))``, Cormack et al., 2009), which
needs no calibration between a ``ts_rank`` and a distance. Without an embedding (the offline
provider) the search is full text alone, scored by the same formula over one list.

The search runs as the server (``run_as_service``: the public widget has no user, and its own
transaction costs one round trip), bypassing row-level security, so the ``agent_id`` filter is the
tenant wall here: an agent belongs to exactly one organization, and a chunk's composite foreign
key keeps it in its agent's organization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from shared.db.adapters import Float4Array
from shared.db.session import Database, run_as_service

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


# The ranking itself is the SQL function private.search_knowledge (see its migration). The question's
# embedding travels as a binary real[] (``VECTOR_PARAMETER``, ``Float4Array``), which pgvector casts
# to a vector: formatting 1536 floats as text cost about a millisecond a query.
VECTOR_PARAMETER = "%(embedding)b::extensions.vector(1536)"
_SEARCH = f"""
select id, url, title, content, score
  from private.search_knowledge(%(agent_id)s, %(query)s, {VECTOR_PARAMETER},
                                %(limit)s, %(candidates)s, %(k)s)
"""  # noqa: S608 - VECTOR_PARAMETER is a constant


async def search_knowledge(
    db: Database,
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
        "embedding": Float4Array(query_embedding) if query_embedding is not None else None,
        "k": RRF_K,
        "candidates": max(_CANDIDATES_PER_LIST, limit),
        "limit": limit,
    }
    return [RetrievedChunk(**row) for row in await run_as_service(db, _SEARCH, params)]
