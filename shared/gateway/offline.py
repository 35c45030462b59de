"""The offline provider: answers from retrieved knowledge when no model API key is configured.

It makes the local stack work with no network, and it is honest about what it is: the reply says
it quotes the business's documentation, or that nothing matched and the team can take over. It
reads intents from the visitor's last message with plain patterns, no model:

* asking for a person ("human", "agent", "person", "someone", "talk to"...) -> ``escalate``;
* an email address or a phone number -> ``capture_lead`` (with a name when "my name is ..." says it).

Tool calls are made only for tools the caller offered (``WIDGET_TOOLS``). A question that nothing
matched is answered with an offer to pass it on, not an automatic escalation: without a model the
provider cannot tell a question from small talk, and a review item for every "hi" would bury the
queue. Token counts are estimated by word count; the cost is always 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from shared.gateway.schemas import ChatMessage, ToolCall
from shared.gateway.tools import CAPTURE_LEAD, ESCALATE
from shared.retrieval import RetrievedChunk

EXCERPT_INTRO = "Here is what I found in our documentation:"
NO_MATCH_REPLY = (
    "I couldn't find that in our documentation. I can pass your question to the team: "
    "just ask for a person, or leave your email address and someone will get back to you."
)
ESCALATION_REPLY = "I'll pass your message to a person on the team, and they'll get back to you."
ASK_FOR_CONTACT = " If you'd like the answer by email, leave your address here."
LEAD_REPLY = "Thank you, I've noted your contact details and the team will be in touch."
LEAD_AND_ESCALATION_REPLY = (
    "Thank you, I've noted your contact details and passed your message to a person on the team; "
    "they'll get back to you."
)

MAX_EXCERPTS = 2
MAX_EXCERPT_CHARS = 400
MAX_SUMMARY_CHARS = 500

_HUMAN = re.compile(
    r"\b(?:humans?|agents?|persons?|someone|somebody|representative|operator|real person"
    r"|talk to|speak to|speak with|chat with a)\b",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{5,}\d(?!\w)")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_NAME = re.compile(r"(?i:\bmy name is|\bi am|\bi'm|\bthis is)\s+([A-Z][A-Za-z'-]+(?:\s+[A-Z][A-Za-z'-]+)?)")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Words too common to tell one sentence of an excerpt from another.
_STOPWORD_LIST = (
    "a an and are can do does for how i in is it me my of on or our the this to we what when where which who why"
    " with you your"
)
_STOPWORDS = frozenset(_STOPWORD_LIST.split())


@dataclass(frozen=True, slots=True)
class OfflineAnswer:
    content: str
    tool_calls: list[ToolCall]
    prompt_tokens: int
    completion_tokens: int


def answer(
    messages: Sequence[ChatMessage], knowledge: Sequence[RetrievedChunk], offered: frozenset[str]
) -> OfflineAnswer:
    question = next((m.content for m in reversed(messages) if m.role == "user"), "")
    excerpts = _excerpt_answer(question, knowledge)
    calls: list[ToolCall] = []

    lead = find_contact(question) if CAPTURE_LEAD in offered else None
    if lead is not None:
        calls.append(ToolCall(CAPTURE_LEAD, lead))
    wants_human = ESCALATE in offered and asks_for_human(question)
    if wants_human:
        calls.append(
            ToolCall(
                ESCALATE,
                {
                    "reason": "visitor_requested_human",
                    "summary": _clip(question, MAX_SUMMARY_CHARS),
                    "draft_reply": excerpts or "",
                },
            )
        )

    if lead is not None and wants_human:
        content = LEAD_AND_ESCALATION_REPLY
    elif lead is not None:
        content = LEAD_REPLY
    elif wants_human:
        content = ESCALATION_REPLY + ASK_FOR_CONTACT
    elif excerpts:
        content = excerpts
    else:
        content = NO_MATCH_REPLY

    prompt_words = sum(_words(m.content) for m in messages) + sum(_words(c.content) for c in knowledge)
    return OfflineAnswer(content, calls, prompt_tokens=prompt_words, completion_tokens=_words(content))


def asks_for_human(text: str) -> bool:
    return _HUMAN.search(text) is not None


def find_contact(text: str) -> dict[str, str | None] | None:
    """``capture_lead`` arguments for the contact details in ``text``; ``None`` when there are none."""
    email_match = _EMAIL.search(text)
    email = email_match.group(0) if email_match else None
    without_email = _EMAIL.sub(" ", text)
    phone = next(
        (
            match.group(0).strip()
            for match in _PHONE.finditer(without_email)
            if 7 <= sum(ch.isdigit() for ch in match.group(0)) <= 15 and not _ISO_DATE.fullmatch(match.group(0))
        ),
        None,
    )
    if email is None and phone is None:
        return None
    name_match = _NAME.search(text)
    return {
        "email": email,
        "phone": phone,
        "name": name_match.group(1) if name_match else None,
        "note": _clip(text, MAX_SUMMARY_CHARS),
    }


def _excerpt_answer(question: str, knowledge: Sequence[RetrievedChunk]) -> str:
    if not knowledge:
        return ""
    terms = {w for w in _WORD.findall(question.lower()) if w not in _STOPWORDS and len(w) > 2}
    parts = [EXCERPT_INTRO]
    for chunk in knowledge[:MAX_EXCERPTS]:
        source = " ".join(part for part in (chunk.title, f"({chunk.url})" if chunk.url else "") if part)
        quote = f"\u201c{_best_passage(chunk.content, terms)}\u201d"
        parts.append(f"{quote}\n\u2014 {source}" if source else quote)
    return "\n\n".join(parts)


def _best_passage(content: str, terms: set[str]) -> str:
    """The sentences of ``content`` around the one sharing most words with the question."""
    sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(content.split())) if s.strip()]
    if not sentences:
        return ""
    scores = [len(terms & set(_WORD.findall(s.lower()))) for s in sentences]
    start = max(range(len(sentences)), key=lambda i: (scores[i], -i))
    passage = sentences[start]
    for sentence in sentences[start + 1 :]:
        if len(passage) + 1 + len(sentence) > MAX_EXCERPT_CHARS:
            break
        passage = f"{passage} {sentence}"
    return _clip(passage, MAX_EXCERPT_CHARS)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0]
    return f"{cut}\u2026"


def _words(text: str) -> int:
    return len(text.split())
