"""URL normalisation and the same-site rule, fast enough to run on every link of every page.

The common case (ASCII, nothing to percent-encode) is handled with ``urllib.parse`` and cached;
anything else (international names, IPv6 literals, characters that need encoding) goes through
``httpx.URL``, the parser the egress guard itself uses. These spellings only decide what counts as
one page: what may be reached is decided by the guard on every request, whatever the spelling.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

DEFAULT_PORTS: Final = {"http": 80, "https": 443}
MAX_URL_LENGTH: Final = 2048
_TRACKING_PARAMS: Final = frozenset({"gclid", "fbclid", "msclkid", "dclid", "yclid", "mc_cid", "mc_eid", "_ga", "_gl"})
# Never worth a request: the Content-Type check would refuse them after the headers anyway.
# fmt: off
BINARY_EXTENSIONS: Final = frozenset({
    ".pdf", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".tar", ".exe", ".dmg", ".msi", ".pkg", ".deb",
    ".rpm", ".apk", ".iso", ".bin", ".img", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".bmp", ".tif",
    ".tiff", ".ico", ".svg", ".heic", ".psd", ".mp3", ".wav", ".ogg", ".flac", ".m4a", ".aac", ".mp4", ".m4v",
    ".mov", ".avi", ".mkv", ".webm", ".wmv", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods",
    ".odp", ".rtf", ".epub", ".css", ".js", ".mjs", ".map", ".json", ".xml", ".rss", ".atom", ".csv", ".woff",
    ".woff2", ".ttf", ".otf", ".eot",
})
# fmt: on
# Characters that appear in an already well-formed ASCII URL; anything else takes the httpx path.
_PLAIN_URL: Final = re.compile(r"^[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*$")
_PLAIN_HOST: Final = re.compile(r"^[a-z0-9.-]+$")


def _keep_param(key: str) -> bool:
    lowered = key.lower()
    return lowered not in _TRACKING_PARAMS and not lowered.startswith("utm_")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, for absolute hrefs (urljoin only does it when it joins)."""
    if "/." not in path:
        return path
    output: list[str] = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    trailing = "/" if path.endswith(("/.", "/..")) else ""
    return "/" + "/".join(output) + trailing


def _slow(href: str, base: str | None) -> str | None:
    try:
        url = httpx.URL(base).join(href) if base is not None else httpx.URL(href)
        if url.scheme not in DEFAULT_PORTS or not url.host or url.userinfo:
            return None
        if url.port == DEFAULT_PORTS[url.scheme]:
            url = url.copy_with(port=None)
        params: list[tuple[str, str | int | float | bool | None]] = sorted(
            (key, value) for key, value in url.params.multi_items() if _keep_param(key)
        )
        query = str(httpx.QueryParams(params)).encode("ascii") or None
        url = url.copy_with(fragment=None, query=query, path=url.path or "/")
    except (httpx.InvalidURL, TypeError, ValueError, UnicodeError):
        return None
    return str(url)


@lru_cache(maxsize=16_384)
def _normalise(href: str, base: str | None) -> str | None:
    joined = urljoin(base, href) if base is not None else href
    if not (joined.isascii() and _PLAIN_URL.match(joined)):
        return _slow(href, base)
    try:
        parts = urlsplit(joined)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or "@" in parts.netloc:
        return None
    host = parts.hostname or ""  # lower-cased by urlsplit
    if not host or not _PLAIN_HOST.match(host) or "%" in parts.netloc:
        return _slow(href, base)  # IPv6 literals, zone ids, escapes: the careful parser decides
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = _remove_dot_segments(parts.path) or "/"
    query = ""
    if parts.query:
        pairs = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if _keep_param(k))
        query = urlencode(pairs)
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def normalise(href: str, base: httpx.URL | str | None = None) -> str | None:
    """The one spelling of a URL we store and compare: absolute, http(s), no fragment, no userinfo,
    lower-case host, no default port, ``/`` for an empty path, dot segments resolved, tracking
    parameters dropped and the rest sorted. ``None`` for anything that is not a web page address."""
    href = href.strip()
    if not href or href.startswith("#"):
        return None
    result = _normalise(href, str(base) if base is not None else None)
    return result if result is not None and len(result) <= MAX_URL_LENGTH else None


@lru_cache(maxsize=16_384)
def site_of(url: str) -> tuple[str, int | None]:
    """(host with ``www.`` folded, explicit port) of a normalised URL: the same key, the same site."""
    parts = urlsplit(url)
    host = (parts.hostname or "").removesuffix(".").removeprefix("www.")
    port = parts.port if parts.port != DEFAULT_PORTS.get(parts.scheme) else None
    return host, port


@lru_cache(maxsize=16_384)
def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a normalised URL: where its robots.txt lives."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def has_binary_extension(url: str) -> bool:
    path = urlsplit(url).path.lower()
    last = path.rsplit("/", 1)[-1]
    return "." in last and "." + last.rsplit(".", 1)[-1] in BINARY_EXTENSIONS
