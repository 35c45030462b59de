"""A fetched page -> its title, main text and links.

HTML is parsed once with lxml: links, ``<base href>`` and ``<meta name="robots">`` are read from the
tree, then trafilatura (maintained, the best-scoring open-source main-text extractor in published
comparisons) takes the main text from the same tree, leaving navigation, footers and boilerplate
out. Plain text is taken as it is. trafilatura is imported on first use, so a cold start that never
extracts a page (the POST function) does not load it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

_CHARSET_HEADER: Final = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9._:-]+)", re.IGNORECASE)
_CHARSET_META: Final = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?([A-Za-z0-9._:-]+)", re.IGNORECASE)
_XML_DECLARATION: Final = re.compile(r"^\s*<\?xml[^>]*\?>")
_DIRECTIVE_SPLIT: Final = re.compile(r"[\s,]+")
MAX_TITLE_CHARS: Final = 500


@dataclass(frozen=True, slots=True)
class Extracted:
    title: str | None
    text: str
    links: list[str] = field(default_factory=list)  # as written (relative or absolute), base already applied
    base: str | None = None  # the document's <base href>, when it has one
    noindex: bool = False
    nofollow: bool = False


def _charset(content_type: str, body: bytes) -> str:
    for found in (_CHARSET_HEADER.search(content_type), _CHARSET_META.search(body[:2048])):
        if found is not None:
            name = found.group(1)
            charset = name.decode("ascii", "replace") if isinstance(name, bytes) else name
            try:
                "".encode(charset)
            except LookupError:
                continue
            return charset
    return "utf-8"


def _clean_title(title: str | None) -> str | None:
    if not title:
        return None
    title = " ".join(title.split())
    return title[:MAX_TITLE_CHARS] or None


def extract_plain(body: bytes, content_type: str) -> Extracted:
    text = body.decode(_charset(content_type, body), errors="replace").replace("\x00", "")
    return Extracted(title=None, text=text.strip())


def extract_html(body: bytes, content_type: str, *, url: str) -> Extracted:
    import lxml.etree  # type: ignore[import-untyped]  # no stubs shipped
    import lxml.html  # type: ignore[import-untyped]
    import trafilatura

    # Decoded here, with Python's codecs (libxml2 knows fewer charset names), and handed over as
    # text; an XML declaration would make lxml refuse a str, and says nothing the charset did not.
    markup = _XML_DECLARATION.sub("", body.decode(_charset(content_type, body), errors="replace"), count=1)
    parser = lxml.html.HTMLParser(remove_comments=True)
    try:
        tree = lxml.html.fromstring(markup, parser=parser)
    except (lxml.etree.ParserError, ValueError):  # empty or unparsable document
        return Extracted(title=None, text="")
    if tree is None:
        return Extracted(title=None, text="")

    directives = {
        token
        for value in tree.xpath(
            "//meta[translate(@name, 'ROBTS', 'robts') = 'robots' "
            "or translate(@name, 'HIREDANBOT', 'hiredanbot') = 'hiredhandsbot']/@content"
        )
        for token in _DIRECTIVE_SPLIT.split(str(value).lower())
    }
    noindex = bool(directives & {"noindex", "none"})
    nofollow = bool(directives & {"nofollow", "none"})

    bases = tree.xpath("//base/@href")
    base = str(bases[0]).strip() if bases else None
    links = [] if nofollow else [str(href).strip() for href in tree.xpath("//a[@href]/@href")]
    head_title = tree.findtext(".//title")

    if noindex:
        return Extracted(
            title=_clean_title(head_title), text="", links=links, base=base, noindex=True, nofollow=nofollow
        )

    document = trafilatura.bare_extraction(
        tree, url=url, with_metadata=True, include_comments=False, include_tables=True, include_images=False
    )
    text = ""
    title = head_title
    if isinstance(document, dict):  # only with as_dict=True, which is not asked for
        document = None
    if document is not None:
        text = (document.text or "").strip()
        title = document.title or head_title
    return Extracted(
        title=_clean_title(title), text=text.replace("\x00", ""), links=links, base=base, nofollow=nofollow
    )
