"""Split a page's text into retrievable passages: paragraph boundaries first, then sentences, then
words; consecutive chunks overlap by whole sentences so an answer that straddles a boundary is whole
in at least one chunk.

Sizes are in characters, not tokens (no tokenizer at cold start): about 1,200 characters is about
250-300 English tokens, small enough that a chunk is about one thing and large enough to carry its
context; ``text-embedding-3-small`` accepts 8,191 tokens, far above.
"""

from __future__ import annotations

import re
from typing import Final

TARGET_CHARS: Final = 1200
OVERLAP_CHARS: Final = 200
MIN_CHUNK_CHARS: Final = 40  # a trailing scrap shorter than this joins the previous chunk

_PARAGRAPHS: Final = re.compile(r"\n\s*\n|\n")
# A sentence ends with . ! ? (optionally followed by a closing quote or bracket) before whitespace.
_SENTENCES: Final = re.compile(r"(?<=[.!?])[\"')\]]?\s+")
_SPACES: Final = re.compile(r"[ \t\f\v\r]+")


def _units(text: str, target: int) -> list[str]:
    """Paragraphs, with paragraphs over ``target`` split into sentences, and those into word runs."""
    units: list[str] = []
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = _SPACES.sub(" ", paragraph).strip()
        if not paragraph:
            continue
        if len(paragraph) <= target:
            units.append(paragraph)
            continue
        for sentence in _SENTENCES.split(paragraph):
            sentence = sentence.strip()
            if not sentence:
                continue
            if len(sentence) <= target:
                units.append(sentence)
                continue
            words: list[str] = []
            size = 0
            for word in sentence.split(" "):
                if words and size + 1 + len(word) > target:
                    units.append(" ".join(words))
                    words, size = [], 0
                # A single "word" longer than the target (a URL, base64) is cut hard.
                while len(word) > target:
                    units.append(word[:target])
                    word = word[target:]
                words.append(word)
                size += len(word) + (1 if size else 0)
            if words:
                units.append(" ".join(words))
    return units


def _tail(units: list[str], budget: int) -> list[str]:
    """The last whole units of a chunk that fit in ``budget`` characters (the overlap)."""
    tail: list[str] = []
    size = 0
    for unit in reversed(units):
        if size + len(unit) > budget:
            break
        tail.insert(0, unit)
        size += len(unit) + 1
    return tail


def chunk_text(text: str, *, target: int = TARGET_CHARS, overlap: int = OVERLAP_CHARS) -> list[str]:
    """Chunks of at most about ``target`` characters; neighbours share up to ``overlap`` characters."""
    if target <= 0 or not 0 <= overlap < target:
        raise ValueError("need target > 0 and 0 <= overlap < target")
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for unit in _units(text, target):
        if current and size + 1 + len(unit) > target:
            chunks.append(current)
            # Carry the previous chunk's last sentences over, but never a whole previous chunk.
            carried = _tail(current, overlap) if len(current) > 1 else []
            current = [*carried]
            size = sum(len(u) for u in current) + max(0, len(current) - 1)
            if current and size + 1 + len(unit) > target:
                current, size = [], 0
        current.append(unit)
        size += len(unit) + (1 if len(current) > 1 else 0)
    if current:
        if chunks and sum(len(u) for u in current) < MIN_CHUNK_CHARS:
            chunks[-1].extend(u for u in current if u not in chunks[-1])
        else:
            chunks.append(current)
    return ["\n".join(units) for units in chunks]
