"""Refuse request bodies that carry card data, before anything parses, stores or logs them.

Two signals, either one enough:

* a key that names a card field (``card``, ``number``, ``cvc``, ``exp_month`` ... in any case or
  spelling: ``cardNumber``, ``card-number``, ``CVV2``), at any depth of a JSON body;
* a primary account number anywhere in the raw text: a run of 13 to 19 ASCII digits, optionally
  grouped by single spaces or dashes, that passes the Luhn check and stands alone (not glued to
  letters, so the digit runs inside UUIDs and ids never match).

The raw bytes are scanned, not just the parsed JSON, so a PAN inside any string, number, key, or
a body that is not even JSON is caught. The error says only that card data is refused; neither the
number nor the field it came in is repeated in the response or the log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Final

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

# Digit groups separated by at most one space or dash, not touching a letter, digit, '_' or '-'.
# A run after "+" is an international phone number (E.164), never a card number.
_DIGIT_RUN: Final = re.compile(r"(?<![0-9A-Za-z_\-+])[0-9]+(?:[ \-][0-9]+)*(?![0-9A-Za-z_\-])")
_GROUP_SPLIT: Final = re.compile(r"[ \-]")
PAN_MIN_DIGITS: Final = 13
PAN_MAX_DIGITS: Final = 19


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


def _pan_candidates(run: str) -> Iterator[str]:
    """Every contiguous sequence of digit groups in one run with 13 to 19 digits in all."""
    groups = _GROUP_SPLIT.split(run)
    for start in range(len(groups)):
        digits = ""
        for group in groups[start:]:
            digits += group
            if len(digits) > PAN_MAX_DIGITS:
                break
            if len(digits) >= PAN_MIN_DIGITS:
                yield digits


def contains_pan(text: str) -> bool:
    for match in _DIGIT_RUN.finditer(text):
        if any(luhn_valid(candidate) for candidate in _pan_candidates(match.group())):
            return True
    return False


def is_card_key(key: str) -> bool:
    normalized = "".join(ch for ch in key.lower() if ch.isalnum())
    if normalized in _CARD_KEYS:
        return True
    return normalized.startswith(_CARD_KEY_PREFIXES)


def _keys(document: Any) -> Iterator[str]:
    """Every object key at any depth (iterative: nesting depth costs no stack)."""
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                yield str(key)
                pending.append(item)
        elif isinstance(value, list):
            pending.extend(value)


def carries_card_data(raw: bytes) -> bool:
    text = raw.decode("utf-8", "replace")
    if contains_pan(text):
        return True
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return False  # not JSON: the parser refuses it next, without echoing it
    return any(is_card_key(key) for key in _keys(document))


def refuse_card_data(raw: bytes) -> None:
    """Raise ``CardDataRefused`` (422) when the body carries card-like data."""
    if carries_card_data(raw):
        raise CardDataRefused
