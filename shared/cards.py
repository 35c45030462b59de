"""Refuse request bodies that carry card data, before anything stores, logs or forwards them.

What is scanned is what the application sees: the body as its parser decodes it (JSON in UTF-8,
-16 or -32, ``\\u`` escapes resolved; a form's percent-decoded fields; any other body as text), not
the raw bytes. Two signals, either one enough:

* a key that names a card field (``card``, ``number``, ``cvc``, ``exp_month`` ... in any case or
  spelling: ``cardNumber``, ``card-number``, ``CVV2``), or a key that holds a card number, at any
  depth;
* a primary account number in a value a person typed: 13 to 19 digits passing the Luhn check, in
  any script's digits (full-width, Arabic-Indic ...), written in groups separated by
  spaces, dashes or dots, with invisible characters (zero-width spaces, soft hyphens) ignored, and
  standing alone (not glued to a letter or ``_``, not an id like ``cus_4242...`` or ``ORD-4242...``,
  not a ``+`` phone number).

Where the scan does not look: a value whose schema field is a machine value, marked ``Identifier``
(URLs, credentials, repository names) or typed ``UUID``. A Discord webhook URL holds a 17-19-digit
id that passes Luhn one time in ten; the person pasting it typed no card number. Such a field is
validated by its own type and never shown to a model or a visitor. Keys are always scanned.

The refusal says only that card data is refused; neither the number nor the field it came in is
repeated in the response or the log (``redact_pans`` removes numbers from anything echoed).
"""

from __future__ import annotations

import json
import re
import types
import unicodedata
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin
from urllib.parse import parse_qsl

from pydantic import BaseModel

from shared.errors import Unprocessable


class CardDataRefused(Unprocessable):
    """A request body carried card-like data. The detail is fixed: nothing of the body is repeated."""

    type_slug = "card-data-refused"
    title = "Card data is never accepted here"

    def __init__(self) -> None:
        super().__init__(
            "Card data is never accepted here. Payment details are entered on Stripe's own pages only; "
            "remove them from the request."
        )


@dataclass(frozen=True, slots=True)
class Identifier:
    """Schema marker: this field holds a machine value (a URL, a credential, an id), not free text.

    ``Annotated[SecretStr, Identifier("a webhook URL")]``. The card scan skips the value; the field's
    own type must keep free text out of it, and its value must never be shown to a person or a model.
    """

    what: str


# Keys normalized to lowercase letters and digits.
_CARD_KEYS: Final = frozenset(
    {
        "card",
        "cards",
        "number",
        "cardnumber",
        "ccnumber",
        "creditcard",
        "pan",
        "cvc",
        "cvc2",
        "cvv",
        "cvv2",
        "cid",
        "securitycode",
        "expmonth",
        "expyear",
        "expiry",
        "expiration",
        "expirationdate",
        "expdate",
        "track1",
        "track2",
        "ccnum",
        "ccexp",
        "cccvc",
        "cccvv",
    }
)
_CARD_KEY_PREFIXES: Final = ("card", "creditcard")

PAN_MIN_DIGITS: Final = 13
PAN_MAX_DIGITS: Final = 19

# After folding (below): digit groups separated by one to three separators, not glued to a letter,
# a digit or '_' (directly or through one '-': "ORD-4242..." is an id), and not after '+' (E.164).
_DIGIT_RUN: Final = re.compile(
    r"(?<![0-9A-Za-z_+])(?<![0-9A-Za-z_]-)[0-9]+(?:[\s.\-]{1,3}[0-9]+)*(?![0-9A-Za-z_])(?!-[0-9A-Za-z_])"
)
_GROUP_SPLIT: Final = re.compile(r"[\s.\-]+")
# Dots people put between digit groups, beyond '.' itself (NFKC maps the full-width stop to '.').
_DOTS: Final = frozenset("·‧∙•・")


def _fold_char(char: str) -> str:
    """One character as the PAN pattern reads it: a digit in any script becomes its ASCII digit,
    any space, dash or dot becomes ' ', '-' or '.', invisible characters vanish."""
    if "0" <= char <= "9" or char.isascii():
        return char
    digit = unicodedata.digit(char, None)
    if digit is not None:
        return str(digit)
    category = unicodedata.category(char)
    if category in ("Cf", "Mn", "Me"):  # zero-width spaces, joiners, soft hyphens, combining marks
        return ""
    if char.isspace() or category == "Zs":
        return " "
    if category == "Pd" or char == "\u2212":  # every dash, and the minus sign
        return "-"
    if char in _DOTS or unicodedata.normalize("NFKC", char) == ".":
        return "."
    return char


def _fold(text: str) -> tuple[str, list[int]]:
    """``text`` folded, and for each folded character the index of the character it came from."""
    if text.isascii():
        return text, list(range(len(text)))
    folded: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        mapped = _fold_char(char)
        if mapped:
            folded.append(mapped)
            origin.append(index)
    return "".join(folded), origin


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _run_holds_pan(run: str) -> bool:
    """Whether whole digit groups of one run, taken contiguously, make 13 to 19 digits passing Luhn.

    Prefix sums of each digit's Luhn value, undoubled and doubled by parity, make each candidate an
    O(1) check, so a run of thousands of one-digit groups costs linear time, not a Luhn per candidate.
    """
    groups = _GROUP_SPLIT.split(run)
    digits = "".join(groups)
    boundaries = [0]
    for group in groups:
        boundaries.append(boundaries[-1] + len(group))
    # sums[q][k]: the Luhn sum of digits[:k] when the positions k' with k' % 2 == q are doubled.
    sums = ([0], [0])
    for position, char in enumerate(digits):
        value = ord(char) - 48
        doubled = value * 2 - 9 if value > 4 else value * 2
        sums[0].append(sums[0][-1] + (doubled if position % 2 == 0 else value))
        sums[1].append(sums[1][-1] + (doubled if position % 2 == 1 else value))
    end_index = 0
    for start in boundaries:
        while end_index < len(boundaries) and boundaries[end_index] - start < PAN_MIN_DIGITS:
            end_index += 1
        for index in range(end_index, len(boundaries)):
            end = boundaries[index]
            if end - start > PAN_MAX_DIGITS:
                break
            # Counted from the right end, the doubled digits are those at index k with k % 2 == end % 2.
            parity = end % 2
            if (sums[parity][end] - sums[parity][start]) % 10 == 0:
                return True
    return False


def _pan_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` in ``text`` of each digit run that holds a card number."""
    folded, origin = _fold(text)
    for match in _DIGIT_RUN.finditer(folded):
        if _run_holds_pan(match.group()):
            yield origin[match.start()], origin[match.end() - 1] + 1


def contains_pan(text: str) -> bool:
    return next(_pan_spans(text), None) is not None


REDACTED_PAN: Final = "[card number removed]"


def redact_pans(text: str) -> str:
    """``text`` with every card number replaced: for anything that echoes input (a ``loc``, a log)."""
    spans = list(_pan_spans(text))
    for start, end in reversed(spans):
        text = text[:start] + REDACTED_PAN + text[end:]
    return text


def is_card_key(key: str) -> bool:
    normalized = "".join(ch for ch in unicodedata.normalize("NFKC", _fold(key)[0]).lower() if ch.isalnum())
    if normalized in _CARD_KEYS:
        return True
    return normalized.startswith(_CARD_KEY_PREFIXES)


# -- what the application sees ---------------------------------------------------------------------

Path = tuple[str, ...]
ANY: Final = "*"
"""A path step that stands for every item of a list or every value of a mapping."""


@dataclass(frozen=True, slots=True)
class FormFields:
    """A form body (``application/x-www-form-urlencoded`` or ``multipart/form-data``), decoded."""

    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Text:
    """A body that is neither JSON nor a form: scanned whole, nothing exempt."""

    text: str


def decode_body(raw: bytes, content_type: str | None) -> Any:
    """The body as the application's parser would read it.

    JSON first, whatever the declared type (``json.loads`` on bytes, as Starlette parses it, detects
    UTF-8, -16 and -32); then a form, by its declared type; anything else is text.
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        pass
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        text = raw.decode("utf-8", "replace")
        return FormFields(tuple(parse_qsl(text, keep_blank_values=True, max_num_fields=10_000)))
    if media_type == "multipart/form-data" and content_type:
        form = _multipart(raw, content_type)
        if form is not None:
            return form
    return Text(_as_text(raw))


def _as_text(raw: bytes) -> str:
    try:
        encoding = json.detect_encoding(raw)
    except (ValueError, LookupError):
        encoding = "utf-8"
    return raw.decode(encoding, "replace")


def _multipart(raw: bytes, content_type: str) -> FormFields | None:
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=HTTP).parsebytes(head + raw)
    if not message.is_multipart():
        return None
    pairs: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition") or ""
        filename = part.get_filename() or ""
        payload = part.get_payload(decode=True)  # base64 and quoted-printable undone
        value = payload.decode(part.get_content_charset() or "utf-8", "replace") if isinstance(payload, bytes) else ""
        pairs.append((f"{name} {filename}".strip(), value))
    return FormFields(tuple(pairs))


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _is_exempt(path: Path, exempt: frozenset[Path]) -> bool:
    return any(
        len(pattern) <= len(path) and all(p in (ANY, q) for p, q in zip(pattern, path, strict=False))
        for pattern in exempt
    )


def carries_card_data(document: Any, exempt: frozenset[Path] = frozenset()) -> bool:
    """Whether a decoded body (``decode_body``) carries card data; values under ``exempt`` paths
    (``identifier_paths``) are machine values and only their keys are scanned."""
    if isinstance(document, Text):
        return contains_pan(document.text)
    if isinstance(document, FormFields):
        return any(
            is_card_key(key) or contains_pan(key) or (not _is_exempt((key,), exempt) and contains_pan(value))
            for key, value in document.pairs
        )
    pending: list[tuple[Path, Any]] = [((), document)]  # iterative: nesting depth costs no stack
    while pending:
        path, value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                key = str(key)
                if is_card_key(key) or contains_pan(key):
                    return True
                pending.append(((*path, key), item))
        elif isinstance(value, list):
            pending.extend(((*path, ANY), item) for item in value)
        elif (text := _scalar_text(value)) is not None and not _is_exempt(path, exempt) and contains_pan(text):
            return True
    return False


def refuse_card_data(document: Any, exempt: frozenset[Path] = frozenset()) -> None:
    """Raise ``CardDataRefused`` (422) when the decoded body carries card-like data."""
    if carries_card_data(document, exempt):
        raise CardDataRefused


# -- where the schema says a value is not free text ----------------------------------------------


def identifier_paths(annotation: Any) -> frozenset[Path]:
    """The paths, in a body validated as ``annotation``, of values marked ``Identifier`` or typed
    ``UUID``. A path that is free text in any member of a union stays scanned."""
    exempt: set[Path] = set()
    scanned: set[Path] = set()
    _collect(annotation, (), (), exempt, scanned, set())
    return frozenset(p for p in exempt if not any(s[: len(p)] == p or p[: len(s)] == s for s in scanned))


def _collect(
    annotation: Any,
    metadata: Sequence[Any],
    path: Path,
    exempt: set[Path],
    scanned: set[Path],
    seen: set[type],
) -> None:
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        _collect(inner, [*metadata, *extra], path, exempt, scanned, seen)
        return
    if any(isinstance(item, Identifier) for item in metadata) or annotation is uuid.UUID:
        exempt.add(path)
        return
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation in seen:
            return
        for name, field in annotation.model_fields.items():
            key = field.validation_alias if isinstance(field.validation_alias, str) else field.alias or name
            _collect(field.annotation, field.metadata, (*path, key), exempt, scanned, {*seen, annotation})
        return
    if origin in (Union, types.UnionType):
        for member in get_args(annotation):
            _collect(member, metadata, path, exempt, scanned, seen)
        return
    if origin is Literal or annotation is type(None) or annotation is bool:
        return
    if isinstance(origin, type) and issubclass(origin, Mapping):
        value_type = get_args(annotation)[1] if len(get_args(annotation)) == 2 else Any
        _collect(value_type, (), (*path, ANY), exempt, scanned, seen)
        return
    if isinstance(origin, type) and issubclass(origin, Sequence | set | frozenset) and origin is not str:
        for item in get_args(annotation):
            if item is not Ellipsis:
                _collect(item, (), (*path, ANY), exempt, scanned, seen)
        return
    scanned.add(path)
