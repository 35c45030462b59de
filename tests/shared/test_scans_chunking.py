"""Chunking: sensible boundaries, bounded sizes, overlap between neighbours, nothing lost."""

from __future__ import annotations

import itertools
import re

import pytest

from shared.scans.chunking import OVERLAP_CHARS, TARGET_CHARS, chunk_text


def sentences(n: int, start: int = 0) -> str:
    return " ".join(
        f"Sentence number {i} talks about bicycle part {i * 7} in some detail." for i in range(start, start + n)
    )


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+", text)


class TestBoundaries:
    def test_a_short_text_is_one_chunk(self) -> None:
        assert chunk_text("Opening hours: nine to five.") == ["Opening hours: nine to five."]

    def test_empty_and_blank_texts_give_no_chunks(self) -> None:
        assert chunk_text("") == []
        assert chunk_text(" \n\n \t") == []

    def test_paragraphs_that_fit_stay_whole_and_together(self) -> None:
        text = "First paragraph about returns.\n\nSecond paragraph about shipping."
        assert chunk_text(text) == ["First paragraph about returns.\nSecond paragraph about shipping."]

    def test_chunks_break_between_paragraphs_not_inside_them(self) -> None:
        paragraphs = [sentences(6, start=10 * i) for i in range(6)]  # about 400 characters each
        chunks = chunk_text("\n\n".join(paragraphs))
        assert len(chunks) > 1
        for chunk in chunks:
            for part in chunk.split("\n"):
                assert part in paragraphs, "a paragraph that fits is never cut"

    def test_a_long_paragraph_is_cut_between_sentences(self) -> None:
        chunks = chunk_text(sentences(60))
        assert len(chunks) > 1
        for chunk in chunks:
            assert chunk.rstrip().endswith("."), "cut at a sentence end"
            assert chunk[0].isupper()

    def test_a_sentence_longer_than_a_chunk_is_cut_between_words(self) -> None:
        text = " ".join(f"word{i}" for i in range(1000))
        chunks = chunk_text(text)
        assert all(len(c) <= TARGET_CHARS for c in chunks)
        assert all(not c.startswith(" ") and not c.endswith(" ") for c in chunks)

    def test_a_token_longer_than_a_chunk_is_cut_hard(self) -> None:
        text = "x" * (TARGET_CHARS * 2 + 10)
        chunks = chunk_text(text)
        assert len(chunks) == 2, "the 10-character scrap joins the chunk before it"
        assert "".join(c.replace("\n", "") for c in chunks) == text


class TestSizesAndOverlap:
    def test_no_chunk_is_much_longer_than_the_target(self) -> None:
        chunks = chunk_text("\n\n".join(sentences(9, start=9 * i) for i in range(20)))
        assert max(len(c) for c in chunks) <= TARGET_CHARS + 40

    def test_neighbours_share_whole_sentences(self) -> None:
        chunks = chunk_text(sentences(60))
        for before, after in itertools.pairwise(chunks):
            first_of_next = after.split("\n")[0]
            assert first_of_next in before, "the next chunk starts with the previous chunk's last sentence(s)"
            assert len(first_of_next) <= OVERLAP_CHARS

    def test_nothing_is_lost(self) -> None:
        text = "\n\n".join(sentences(7, start=7 * i) for i in range(15))
        covered = set(words_of(" ".join(chunk_text(text))))
        assert covered == set(words_of(text))

    def test_bad_parameters_are_refused(self) -> None:
        with pytest.raises(ValueError, match="target"):
            chunk_text("text", target=100, overlap=100)
