"""Fetching one site politely, through the egress guard.

* **Same site**: the start URL's host, with ``www.`` folded (``example.com`` and ``www.example.com``
  are one site), on the start URL's port. Other subdomains are other sites: ``app.``, ``status.``,
  ``help.`` or ``shop.`` are often different properties (a login app, a hosted status page, a
  third-party help desk) and sometimes other tenants altogether (``*.vercel.app``), and deciding
  what "the same organisation" is across subdomains would need the Public Suffix List and still
  guess. A customer who wants ``docs.example.com`` too adds it as its own source.
* **robots.txt** (RFC 9309) per origin, for the ``HiredHandsBot`` token: 4xx means no rules; 5xx,
  a network failure or a refused destination means "assume complete disallow"; ``Crawl-delay``
  raises the politeness delay up to a cap.
* **Politeness**: one request at a time per host, ``politeness_seconds`` apart, across every
  invocation and scan (``shared.scans.politeness``: a per-host lease in Redis).
* **robots.txt is read once per origin per scan**: a scan advances in many short steps, so the
  rules (a 2xx body, or a 4xx's "no rules") are kept in Redis under the scan's id for its lifetime.
* **Redirects are followed here, not by the client**, so that every hop is judged as a page: it must
  stay on the site, not be disallowed, not loop, not be a page already found, and no more than the
  policy's ``max_redirects`` hops. Each hop still goes through the guard, which vets the address it
  connects to (a same-site name that resolves into a private range is refused there).
* **Caps**: the guard's response size cap (declared, raw and decoded) and its connect/read
  timeouts; here, a total time per page (a slow drip) and HTML or plain text only, judged from
  the ``Content-Type`` before the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import urllib.robotparser
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import httpx
from upstash_redis.asyncio import Redis

from shared.egress import EgressDenied, EgressReason, check_url, guarded_client
from shared.scans.politeness import HostTurns
from shared.scans.schemas import Failure, ScanEnvironment, Skip
from shared.scans.urls import has_binary_extension, normalise, origin_of, site_of

__all__ = ["Crawler", "Failed", "Outcome", "Page", "Skipped", "has_binary_extension", "normalise", "site_of"]

_HTML_TYPES: Final = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_TYPES: Final = frozenset({"text/plain"})
_ACCEPT: Final = "text/html,application/xhtml+xml;q=0.9,text/plain;q=0.8,*/*;q=0.1"
_LOOKS_LIKE_HTML: Final = re.compile(rb"^\s*(?:<!doctype\s+html|<html|<head|<body)", re.IGNORECASE)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
ROBOTS_CACHE_PREFIX: Final = "scan-robots:"
ROBOTS_CACHE_SECONDS: Final = 24 * 3600  # RFC 9309 2.4: cached rules may be used for up to 24 hours


def host_key(url: str) -> str:
    """The server a request goes to (host and port): what politeness is counted against."""
    parts = urlsplit(url)
    return f"{(parts.hostname or '').removesuffix('.')}:{parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)}"


def _egress_skip(reason: EgressReason) -> str:
    if reason is EgressReason.RESPONSE_TOO_LARGE:
        return Skip.TOO_LARGE
    if reason is EgressReason.TOO_MANY_REDIRECTS:
        return Skip.TOO_MANY_REDIRECTS
    return f"egress_{reason.value}"


# ---------------------------------------------------------------------------------------------
# Outcomes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    url: str  # where the content came from, after redirects (normalised)
    body: bytes
    content_type: str
    html: bool
    hops: list[str] = field(default_factory=list)  # redirect targets passed through, final included


@dataclass(frozen=True, slots=True)
class Skipped:
    reason: str
    hops: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Failed:
    reason: Failure


Outcome = Page | Skipped | Failed


class _Robots:
    """One origin's rules; ``None`` parser = complete disallow, for ``refusal``'s reason."""

    def __init__(
        self, parser: urllib.robotparser.RobotFileParser | None, refusal: str = Skip.ROBOTS_UNREACHABLE
    ) -> None:
        self.parser = parser
        self.refusal = refusal

    def allows(self, agent: str, url: str) -> bool:
        return self.parser is not None and self.parser.can_fetch(agent, url)

    def crawl_delay(self, agent: str) -> float:
        if self.parser is None:
            return 0.0
        delay = self.parser.crawl_delay(agent)
        try:
            return float(delay) if delay is not None else 0.0
        except (TypeError, ValueError):
            return 0.0


# ---------------------------------------------------------------------------------------------
# The crawler
# ---------------------------------------------------------------------------------------------


class Crawler:
    """Fetches pages of one site. Create inside ``async with``: it owns a guarded client."""

    def __init__(
        self,
        env: ScanEnvironment,
        *,
        start_url: str,
        agent_token: str,
        redis: Redis | None = None,
        cache_scope: str | None = None,
        client: httpx.AsyncClient | None = None,  # noqa: TID251 - a client from new_client(), kept open
    ) -> None:
        self.env = env
        self.site = site_of(start_url)
        self.agent_token = agent_token
        self._robots: dict[str, _Robots] = {}
        self._delay: dict[str, float] = {}
        # A worker killed mid-request holds the host until its page time is up, and a little more.
        self.turns = HostTurns(redis, hold_seconds=env.page_timeout_seconds + 5.0)
        self._redis = redis
        self._cache_scope = cache_scope  # the scan's id: robots.txt rules kept for the scan's next steps
        self._client: httpx.AsyncClient | None = None  # noqa: TID251 - built by guarded_client
        self._lent_client = client
        self.requests = 0  # every request sent, robots.txt and redirect hops included
        self.page_requests = 0  # requests for pages (redirect hops included), robots.txt not

    async def __aenter__(self) -> Crawler:
        self._client = self._lent_client or new_client(self.env)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None and self._client is not self._lent_client:
            await self._client.aclose()
        self._client = None

    @property
    def client(self) -> httpx.AsyncClient:  # noqa: TID251 - built by guarded_client
        if self._client is None:
            raise RuntimeError("use the crawler inside 'async with'")
        return self._client

    def delay(self, url: str) -> float:
        """Seconds between two requests to ``url``'s host (politeness, or robots.txt's Crawl-delay)."""
        return self._delay.get(site_of(url)[0], self.env.politeness_seconds)

    def same_site(self, url: str) -> bool:
        return site_of(url) == self.site

    # -- robots.txt -------------------------------------------------------------------------------

    async def robots_allow(self, url: str) -> str | None:
        """``None`` when ``url`` may be fetched, else the skip reason."""
        origin = origin_of(url)
        rules = self._robots.get(origin)
        if rules is None:
            rules = await self._load_robots(origin)
            self._robots[origin] = rules
            host = site_of(url)[0]
            delay = min(self.env.max_crawl_delay_seconds, rules.crawl_delay(self.agent_token))
            self._delay[host] = max(self.env.politeness_seconds, delay, self._delay.get(host, 0.0))
        if rules.parser is None:
            return rules.refusal
        return None if rules.allows(self.agent_token, url) else Skip.ROBOTS

    async def _load_robots(self, origin: str) -> _Robots:
        cached = await self._cached_robots(origin)
        if cached is not None:
            return _Robots(_parse_robots(cached))
        rules, text = await self._fetch_robots(origin)
        if text is not None:
            await self._cache_robots(origin, text)
        return rules

    async def _fetch_robots(self, origin: str) -> tuple[_Robots, str | None]:
        """The rules, and their text when they may be kept (a 2xx body; "" for a 4xx's no rules)."""
        url = origin + "/robots.txt"
        try:
            async with self.turns.turn(host_key(url), self.delay(url)), asyncio.timeout(self.env.page_timeout_seconds):
                self.requests += 1
                async with self.client.stream("GET", url, headers={"Accept": "text/plain"}) as response:
                    if 400 <= response.status_code < 500:
                        return _Robots(_parse_robots("")), ""  # "unavailable": no rules (RFC 9309 2.3.1.3)
                    if response.status_code >= 300:
                        return _Robots(None), None  # 5xx, or a redirect past the limit: assume complete disallow
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body.extend(chunk)
                        if len(body) >= self.env.robots_max_bytes:
                            break
        except EgressDenied as denied:
            # The origin itself is refused (e.g. a same-site name that resolves into a private range):
            # recorded as what the guard said, for every page of that origin.
            return _Robots(None, _egress_skip(denied.reason)), None
        except (httpx.HTTPError, TimeoutError):
            return _Robots(None), None  # unreachable: complete disallow (RFC 9309 2.3.1.4)
        text = bytes(body[: self.env.robots_max_bytes]).decode("utf-8", "replace")
        return _Robots(_parse_robots(text)), text

    def _robots_key(self, origin: str) -> str | None:
        return None if self._cache_scope is None else f"{ROBOTS_CACHE_PREFIX}{self._cache_scope}:{origin}"

    async def _cached_robots(self, origin: str) -> str | None:
        key = self._robots_key(origin)
        if key is None or self._redis is None:
            return None
        try:
            raw = await self._redis.get(key)
        except Exception:  # a cache: without it the rules are fetched again
            return None
        return str(json.loads(raw)["text"]) if raw else None

    async def _cache_robots(self, origin: str, text: str) -> None:
        key = self._robots_key(origin)
        if key is None or self._redis is None:
            return
        with contextlib.suppress(Exception):  # a cache: without it the next step fetches the rules again
            await self._redis.set(key, json.dumps({"text": text}), ex=ROBOTS_CACHE_SECONDS)

    # -- pages ------------------------------------------------------------------------------------

    async def fetch(self, url: str, *, seen: set[str]) -> Outcome:
        """Fetch a same-site page, following its redirects by the rules above.

        ``seen``: the URLs already found; a redirect to one of them is a duplicate. The targets
        passed through come back in ``hops`` for the caller to record as found.
        """
        hops: list[str] = []
        current = url
        chain = {url}
        while True:
            refusal = await self.robots_allow(current)
            if refusal is not None:
                return Skipped(refusal, hops)
            outcome = await self._get(current)
            if not isinstance(outcome, str):
                if isinstance(outcome, Page):
                    return Page(outcome.url, outcome.body, outcome.content_type, outcome.html, hops)
                return Skipped(outcome.reason, hops) if isinstance(outcome, Skipped) else outcome
            target = normalise(outcome, current)
            if target is None:
                return Skipped(Skip.HTTP_ERROR, hops)
            if len(hops) >= self.env.policy.max_redirects:
                return Skipped(Skip.TOO_MANY_REDIRECTS, hops)
            if target in chain:
                return Skipped(Skip.REDIRECT_LOOP, hops)
            if not self.same_site(target):
                return Skipped(await self._off_site_reason(target), hops)
            if target in seen:
                return Skipped(Skip.DUPLICATE_URL, hops)
            hops.append(target)
            chain.add(target)
            if has_binary_extension(target):
                return Skipped(Skip.NOT_HTML, hops)
            current = target

    async def _off_site_reason(self, target: str) -> str:
        # Not followed either way; but a redirect into a private range or a metadata service is
        # recorded (and logged by the guard) as what it is, not as an ordinary off-site link.
        try:
            await check_url(target, policy=self.env.policy, resolver=self.env.resolver)
        except EgressDenied as denied:
            if denied.reason in (EgressReason.PRIVATE_ADDRESS, EgressReason.METADATA, EgressReason.INTERNAL_NAME):
                return _egress_skip(denied.reason)
        return Skip.OFF_SITE

    async def _get(self, url: str) -> Page | Skipped | Failed | str:
        """One request. A ``str`` is a redirect's Location."""
        try:
            async with self.turns.turn(host_key(url), self.delay(url)), asyncio.timeout(self.env.page_timeout_seconds):
                self.requests += 1
                self.page_requests += 1
                request = self.client.build_request("GET", url)
                response = await self.client.send(request, stream=True, follow_redirects=False)
                try:
                    return await self._read(url, response)
                finally:
                    await response.aclose()
        except EgressDenied as denied:
            if denied.reason is EgressReason.UNRESOLVABLE:
                return Failed(Failure.CONNECTION_ERROR)
            return Skipped(_egress_skip(denied.reason))
        except TimeoutError:
            return Failed(Failure.TIMEOUT)
        except httpx.TimeoutException:
            return Failed(Failure.TIMEOUT)
        except httpx.HTTPError:
            return Failed(Failure.CONNECTION_ERROR)

    async def _read(self, url: str, response: httpx.Response) -> Page | Skipped | Failed | str:
        status = response.status_code
        if status in (301, 302, 303, 307, 308):
            location = response.headers.get("location")
            return location if location else Skipped(Skip.HTTP_ERROR)
        if status == 429 or status >= 500:
            return Failed(Failure.SERVER_ERROR)
        if not 200 <= status < 300:
            return Skipped(Skip.HTTP_ERROR)
        content_type = response.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()
        if media and media not in _HTML_TYPES and media not in _TEXT_TYPES:
            return Skipped(Skip.NOT_HTML)  # the body is never read
        body = await response.aread()
        html = media in _HTML_TYPES or (not media and bool(_LOOKS_LIKE_HTML.match(body[:1024])))
        if not media and not html:
            return Skipped(Skip.NOT_HTML)
        return Page(url, body, content_type, html)


def new_client(env: ScanEnvironment) -> httpx.AsyncClient:  # noqa: TID251 - built by guarded_client
    """The guarded client a crawler sends through (one request in flight at a time per crawler)."""
    return guarded_client(
        policy=env.policy,
        resolver=env.resolver,
        headers={"User-Agent": env.user_agent, "Accept": _ACCEPT},
        limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
    )


def _parse_robots(text: str) -> urllib.robotparser.RobotFileParser:
    parser = urllib.robotparser.RobotFileParser()
    parser.parse(text.splitlines())
    return parser
