"""Generated card numbers as people and attackers write them, the bodies that carry them in every
encoding our parsers accept, and the machine values (webhook URLs, ids) that must never be taken
for one. Shared by the guard's unit tests and the functions' attacker-side tests."""

from __future__ import annotations

import base64
import json
import string
import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

from hypothesis import strategies as st

from shared.cards import luhn_valid


def luhn_complete(partial: str) -> str:
    """``partial`` with the check digit that makes it pass Luhn."""
    for check in "0123456789":
        if luhn_valid(partial + check):
            return partial + check
    raise AssertionError("unreachable: one check digit always fits")


def pans(min_digits: int = 13, max_digits: int = 19) -> st.SearchStrategy[str]:
    """Luhn-valid numbers of 13 to 19 digits: every one is a possible card number."""
    return st.integers(min_digits - 1, max_digits - 1).flatmap(
        lambda n: st.text("0123456789", min_size=n, max_size=n).map(luhn_complete)
    )


# Digits in other scripts: each block starts at its zero.
DIGIT_ZEROS = {
    "ascii": 0x30,
    "full-width": 0xFF10,
    "arabic-indic": 0x0660,
    "devanagari": 0x0966,
    "mathematical bold": 0x1D7CE,
}
SEPARATORS = ["", " ", "-", ".", " - ", "  ", "\u00a0", "\u2009", "\u3000", "\u2013", "\u2212", "\u00b7", "\t"]
INVISIBLE = ["", "\u200b", "\u00ad", "\u2060", "\ufeff", "\u200d"]


@st.composite
def written(draw: st.DrawFn, pan: str) -> str:
    """``pan`` as someone may write it: grouped, separated, in another script's digits, with
    invisible characters between digits."""
    zero = DIGIT_ZEROS[draw(st.sampled_from(sorted(DIGIT_ZEROS)))]
    digits = "".join(chr(zero + int(d)) for d in pan)
    groups: list[str] = []
    step = draw(st.sampled_from([4, 0]))  # 0: random group sizes
    while digits:
        size = step or draw(st.integers(1, 6))
        groups.append(digits[:size])
        digits = digits[size:]
    invisible = draw(st.sampled_from(INVISIBLE))
    if invisible:
        groups = [invisible.join(group) for group in groups]
    return draw(st.sampled_from(SEPARATORS)).join(groups)


PREFIXES = ["", "my card is ", "Card: ", "pay with ", "(", "\n", "カード番号", "Номер карты: "]
SUFFIXES = ["", " thanks", ".", ", exp 12/29 cvc 123", ")", "!\n", "です"]


@st.composite
def free_text_with_card(draw: st.DrawFn) -> tuple[str, str]:
    """``(text, pan)``: a message a person could type with a card number in it."""
    pan = draw(pans())
    text = draw(st.sampled_from(PREFIXES)) + draw(written(pan)) + draw(st.sampled_from(SUFFIXES))
    return text, pan


def _escape_everything(text: str) -> str:
    """Every character as a JSON ``\\u`` escape (astral ones as surrogate pairs)."""
    units = text.encode("utf-16-be")
    return "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))


@dataclass(frozen=True)
class Body:
    encoding: str
    content: bytes
    content_type: str


JSON_ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]


def json_bodies(fields: dict[str, str]) -> list[Body]:
    """``fields`` as JSON in every encoding ``json.loads`` accepts, and with every character escaped."""
    bodies = [
        Body(f"json/{enc}", json.dumps(fields, ensure_ascii=False).encode(enc), "application/json")
        for enc in JSON_ENCODINGS
    ]
    bodies.append(Body("json/ascii-escapes", json.dumps(fields).encode(), "application/json"))
    escaped = "{" + ", ".join(f'"{_escape_everything(k)}": "{_escape_everything(v)}"' for k, v in fields.items()) + "}"
    bodies.append(Body("json/all-escaped", escaped.encode(), "application/json"))
    return bodies


def every_body(fields: dict[str, str]) -> list[Body]:
    """``fields`` as JSON (every encoding), as a form, as multipart (base64 parts) and as plain text."""
    boundary = uuid.uuid4().hex
    parts = b"".join(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n'
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + base64.b64encode(v.encode())
        + b"\r\n"
        for k, v in fields.items()
    )
    return [
        *json_bodies(fields),
        Body("form", urlencode(fields).encode(), "application/x-www-form-urlencoded"),
        Body("multipart", parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"),
        Body("text", "\n".join(f"{k}: {v}" for k, v in fields.items()).encode(), "text/plain; charset=utf-8"),
    ]


# -- machine values that must pass ---------------------------------------------------------------

_TOKEN = string.ascii_letters + string.digits + "-_"


def snowflakes() -> st.SearchStrategy[str]:
    """Discord ids: 17 to 19 digits; these pass Luhn, the ones a naive scan would refuse."""
    return pans(17, 19).filter(lambda n: n[0] != "0")


@st.composite
def discord_webhook_urls(draw: st.DrawFn, base: str = "https://discord.com") -> str:
    token = draw(st.text(_TOKEN, min_size=60, max_size=68))
    return f"{base}/api/webhooks/{draw(snowflakes())}/{token}"


@st.composite
def slack_webhook_urls(draw: st.DrawFn) -> str:
    ids = st.text(string.ascii_uppercase + string.digits, min_size=8, max_size=11)
    secret = draw(st.text(string.ascii_letters + string.digits, min_size=24, max_size=24))
    return f"https://hooks.slack.com/services/T{draw(ids)}/B{draw(ids)}/{secret}"


@st.composite
def webhook_urls_with_numeric_ids(draw: st.DrawFn) -> str:
    """A customer's own endpoint whose path and query carry Luhn-valid ids."""
    return f"https://hooks.example.com/{draw(snowflakes())}/events?account={draw(pans())}"
