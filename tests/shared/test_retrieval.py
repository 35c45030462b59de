"""Hybrid retrieval over knowledge_chunks in the real Postgres with pgvector."""

from __future__ import annotations

import math
from typing import Any

import pytest

from shared.retrieval import RRF_K, RetrievedChunk, search_knowledge
from tests.conftest import Connection, TransactionDatabase
from tests.factories import create_agent, create_org

DIMENSIONS = 1536


def axis(*weights: float) -> list[float]:
    """A unit vector whose first components are ``weights`` (normalized), the rest zero."""
    norm = math.sqrt(sum(w * w for w in weights))
    return [w / norm for w in weights] + [0.0] * (DIMENSIONS - len(weights))


async def add_chunk(
    conn: Connection,
    agent: dict[str, Any],
    content: str,
    *,
    title: str | None = None,
    url: str | None = None,
    embedding: list[float] | None = None,
) -> int:
    await conn.execute("reset role")
    cur = await conn.execute(
        "insert into public.knowledge_chunks (org_id, agent_id, url, title, content, embedding)"
        " values (%s, %s, %s, %s, %s, %s::extensions.vector) returning id",
        (
            agent["org_id"],
            agent["id"],
            url,
            title,
            content,
            f"[{','.join(map(str, embedding))}]" if embedding else None,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    chunk_id: int = row["id"]
    return chunk_id


async def search(
    db: Connection, agent: dict[str, Any], query: str, embedding: list[float] | None = None, limit: int = 5
) -> list[RetrievedChunk]:
    return await search_knowledge(
        TransactionDatabase(db), agent_id=agent["id"], query=query, query_embedding=embedding, limit=limit
    )


@pytest.fixture
async def agent(db: Connection) -> dict[str, Any]:
    return await create_agent(db, await create_org(db))


class TestFullText:
    async def test_finds_a_chunk_by_its_words_with_english_stemming(
        self, db: Connection, agent: dict[str, Any]
    ) -> None:
        refunds = await add_chunk(
            db,
            agent,
            "Refunds are issued to the original card within five days.",
            title="Refund policy",
            url="https://acme.example/refunds",
        )
        await add_chunk(db, agent, "Our shop opens at nine on weekdays.", title="Opening hours")

        [hit] = await search(db, agent, "how are refunds issued?")

        assert (hit.id, hit.url, hit.title, hit.content) == (
            refunds,
            "https://acme.example/refunds",
            "Refund policy",
            "Refunds are issued to the original card within five days.",
        )
        assert hit.score == pytest.approx(1 / (RRF_K + 1))

    async def test_a_question_with_words_the_passage_lacks_still_finds_it(
        self, db: Connection, agent: dict[str, Any]
    ) -> None:
        returns = await add_chunk(db, agent, "Returns are accepted within 30 days with a receipt.", title="Returns")
        await add_chunk(db, agent, "Our shop opens at nine on weekdays.", title="Opening hours")

        hits = await search(db, agent, "How do returns work?")

        assert [h.id for h in hits] == [returns], "one matching word is enough; more matches rank higher"

    async def test_more_relevant_chunks_rank_first(self, db: Connection, agent: dict[str, Any]) -> None:
        passing = await add_chunk(db, agent, "Shipping to Canada is available. Returns are free.")
        focused = await add_chunk(db, agent, "Shipping costs: shipping is free over 50 dollars; shipping takes 3 days.")

        hits = await search(db, agent, "shipping")

        assert [h.id for h in hits] == [focused, passing]
        assert hits[0].score > hits[1].score

    async def test_missing_title_and_url_come_back_empty(self, db: Connection, agent: dict[str, Any]) -> None:
        await add_chunk(db, agent, "Gift cards never expire.")
        [hit] = await search(db, agent, "gift cards")
        assert (hit.title, hit.url) == ("", "")

    @pytest.mark.parametrize("query", ["", "   ", "how are you", '"unbalanced quote', "-"])
    async def test_a_query_without_searchable_words_finds_nothing_and_does_not_fail(
        self, db: Connection, agent: dict[str, Any], query: str
    ) -> None:
        await add_chunk(db, agent, "How are you today? We are open.")
        assert await search(db, agent, query) == []

    async def test_only_the_agents_own_chunks_are_searched(self, db: Connection, agent: dict[str, Any]) -> None:
        org = {"id": agent["org_id"]}
        sibling = await create_agent(db, org)
        stranger = await create_agent(db, await create_org(db))
        await add_chunk(db, sibling, "Warranty lasts two years.", embedding=axis(1.0))
        await add_chunk(db, stranger, "Warranty lasts two years.", embedding=axis(1.0))

        assert await search(db, agent, "warranty") == []
        assert await search(db, agent, "warranty", axis(1.0)) == []
        assert len(await search(db, sibling, "warranty", axis(1.0))) == 1

    async def test_the_limit_is_applied_and_bounded(self, db: Connection, agent: dict[str, Any]) -> None:
        for i in range(4):
            await add_chunk(db, agent, f"Bikes model {i} come in red.")
        assert len(await search(db, agent, "bikes red", limit=2)) == 2
        with pytest.raises(ValueError, match="limit"):
            await search(db, agent, "bikes", limit=0)


class TestHybrid:
    async def test_the_vector_neighbour_ranks_first_when_embeddings_exist(
        self, db: Connection, agent: dict[str, Any]
    ) -> None:
        # Full text prefers A (it says "battery" twice); the query's embedding is nearest B.
        a = await add_chunk(db, agent, "Battery care: charge the battery monthly.", embedding=axis(0.0, 0.0, 1.0))
        b = await add_chunk(db, agent, "The battery is covered by the warranty.", embedding=axis(1.0, 0.1))
        c = await add_chunk(db, agent, "Winter storage: keep the bike indoors.", embedding=axis(1.0, 0.5))
        query_embedding = axis(1.0)

        text_only = await search(db, agent, "battery")
        hybrid = await search(db, agent, "battery", query_embedding)

        assert [h.id for h in text_only] == [a, b]
        assert [h.id for h in hybrid] == [b, a, c]
        # B: text rank 2 + vector rank 1; A: text rank 1 + vector rank 3; C: vector rank 2 only.
        assert hybrid[0].score == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
        assert hybrid[1].score == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 3))
        assert hybrid[2].score == pytest.approx(1 / (RRF_K + 2))

    async def test_vector_neighbours_answer_when_no_words_match(self, db: Connection, agent: dict[str, Any]) -> None:
        near = await add_chunk(db, agent, "Helmets are included with every rental.", embedding=axis(1.0, 0.2))
        far = await add_chunk(db, agent, "We ship worldwide.", embedding=axis(0.0, 1.0))

        hits = await search(db, agent, "do I need to bring protective headgear", axis(1.0))

        assert [h.id for h in hits] == [near, far]

    async def test_chunks_without_an_embedding_are_still_found_by_their_words(
        self, db: Connection, agent: dict[str, Any]
    ) -> None:
        plain = await add_chunk(db, agent, "Tandem bikes seat two riders.")
        embedded = await add_chunk(db, agent, "Kids bikes have training wheels.", embedding=axis(1.0))

        hits = await search(db, agent, "tandem", axis(1.0))

        assert [h.id for h in hits] == [plain, embedded]
