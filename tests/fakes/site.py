"""A customer's website on loopback, for scans: the third party, replaced at the network edge.

``running_site(pages)`` serves a dict of path -> ``Reply`` on 127.0.0.1 (a uvicorn thread of its
own) and counts every request per path (query included), so a test can prove a page was fetched
once. ``acme_site()`` is the scan test site; ``generated_site(n)`` a site of ``n`` linked pages for
the benchmark. The scanner reaches it as ``http://acme.example:<port>/`` through ``SiteResolver``
and an egress policy with the exact exception ``127.0.0.1:<port>`` (docs/egress.md, "Exceptions").
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import uvicorn
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from shared.egress import SCAN_POLICY, EgressPolicy

HOST = "acme.example"
PRIVATE_ALIAS = "www.acme.example"  # same site, but its DNS answer is a private address
PRIVATE_ALIAS_ADDRESS = "10.20.30.40"
HTML = "text/html; charset=utf-8"


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str | None = HTML
    headers: dict[str, str] = field(default_factory=dict)
    stream_bytes: int = 0  # > 0: a chunked body of this many bytes instead of ``body``
    delay_seconds: float = 0.0  # the server takes this long to answer (requests then overlap if sent so)


@dataclass
class SiteResolver:
    """The customer's DNS: acme.example is the loopback site; www.acme.example points at a private
    address (the guard must refuse it at connect time); anything else does not resolve."""

    answers: dict[str, list[str]]
    lookups: list[str] = field(default_factory=list)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


class FakeSite:
    def __init__(self, pages: dict[str, Reply]) -> None:
        self.pages = pages
        self.hits: Counter[str] = Counter()
        self.user_agents: set[str] = set()
        self.times: list[tuple[float, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests this site was ever answering at once
        self.port = 0
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- what tests use -------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, path: str) -> str:
        return self.origin + path

    def policy(self, *, max_response_bytes: int = SCAN_POLICY.max_response_bytes) -> EgressPolicy:
        """The scan policy plus the one exact exception for this loopback listener. The listener's
        port is also a listed port, so that another address on it (www.acme.example's private
        answer) is judged by the range table, as it would be on port 80."""
        return replace(
            SCAN_POLICY,
            allow_addresses=frozenset({f"127.0.0.1:{self.port}"}),
            allowed_ports=SCAN_POLICY.allowed_ports | {self.port},
            max_response_bytes=max_response_bytes,
        )

    def resolver(self) -> SiteResolver:
        return SiteResolver({HOST: ["127.0.0.1"], PRIVATE_ALIAS: [PRIVATE_ALIAS_ADDRESS]})

    def reset(self) -> None:
        with self._lock:
            self.hits.clear()
            self.times.clear()
            self.max_in_flight = 0

    def page_hits(self) -> Counter[str]:
        """Requests per path, robots.txt left out."""
        with self._lock:
            return Counter({path: n for path, n in self.hits.items() if path != "/robots.txt"})

    # -- the ASGI app ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        with self._lock:
            self.hits[target] += 1
            self.times.append((time.monotonic(), target))
            self.user_agents.add(request.headers.get("user-agent", ""))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        answered = False

        async def send_counting(message: Message) -> None:
            # The request stops being in flight when its last byte is handed over: the client cannot
            # have it any sooner, however late this thread gets to run afterwards on a busy machine.
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not answered:
                answered = True
                with self._lock:
                    self.in_flight -= 1
            await send(message)

        try:
            await self._answer(target, request, scope, receive, send_counting)
        finally:
            if not answered:
                with self._lock:
                    self.in_flight -= 1

    async def _answer(self, target: str, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        reply = self.pages.get(target) or self.pages.get(request.url.path) or Reply(404, b"<h1>Not found</h1>")
        if reply.delay_seconds:
            await asyncio.sleep(reply.delay_seconds)
        headers = dict(reply.headers)
        if reply.content_type:
            headers["content-type"] = reply.content_type
        response: Response
        if reply.stream_bytes:
            response = StreamingResponse(_stream(reply.stream_bytes), status_code=reply.status, headers=headers)
        else:
            response = Response(reply.body, status_code=reply.status, headers=headers)
        await response(scope, receive, send)


async def _stream(size: int) -> AsyncIterator[bytes]:
    block = b"<p>" + b"lorem ipsum dolor sit amet " * 2400 + b"</p>\n"
    sent = 0
    while sent < size:
        yield block
        sent += len(block)


@contextmanager
def running_site(pages: dict[str, Reply]) -> Iterator[FakeSite]:
    site = FakeSite(pages)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    site.port = listener.getsockname()[1]
    config = uvicorn.Config(site, lifespan="off", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="fake-site", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            listener.close()
            raise RuntimeError("the fake site did not start")
        time.sleep(0.01)
    try:
        yield site
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# The scan test site
# ---------------------------------------------------------------------------------------------


def page(title: str, *paragraphs: str, links: tuple[str, ...] = (), head: str = "") -> Reply:
    nav = " ".join(f'<li><a href="{href}">{_label(href)}</a></li>' for href in links)
    body = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    html = (
        f"<!doctype html><html><head><title>{title}</title>{head}</head><body>"
        f"<header><nav><ul>{nav}</ul></nav></header><main><article><h1>{title}</h1>\n{body}\n</article></main>"
        f"<footer>Acme Bikes, 1 Main Street. All rights reserved.</footer></body></html>"
    )
    return Reply(body=html.encode())


def _label(href: str) -> str:
    return href.strip("/").split("?")[0].replace("-", " ").replace("/", " ").title() or "Home"


RETURNS_TEXT = (
    "Every bicycle bought from Acme Bikes may be returned within 30 days of delivery for a full refund, "
    "provided it has not been ridden outdoors.",
    "Returned bicycles must come back in their original packaging. We pay the shipping costs of returns "
    "and refund the purchase price to the original payment method within five business days.",
)

SHIPPING_TEXT = (
    "Orders placed before noon leave our warehouse the same day. Delivery takes two to four working days "
    "anywhere in the country.",
    "Parcels are tracked; the tracking number is emailed as soon as the courier collects the parcel.",
)

HOME_LINKS = (
    "/about",
    "/returns",
    "/returns?utm_source=newsletter",
    "/shipping",
    "/old-returns",
    "/contact#form",
    "/private/secret",
    "/brochure.pdf",
    "/download",
    "/huge",
    "/missing",
    "/flaky",
    "/loop/a",
    "/trail/1",
    "/copy-of-shipping",
    "/redirect-metadata",
    "/moved-in",
    "/partner",
    "/draft",
    "/notes.txt",
    "/r1",
    "mailto:hello@acme.example",
    "https://social.example/acme",
)

# What a scan of acme_site() with max_depth=3 must store, and why it must skip the rest.
STORED_PATHS = frozenset(
    {
        "/",
        "/about",
        "/returns",
        "/shipping",
        "/contact",
        "/loop/a",
        "/loop/b",
        "/trail/1",
        "/trail/2",
        "/trail/3",
        "/notes.txt",
    }
)
EXPECTED_SKIPS = {
    "robots": 1,  # /private/secret
    "not_html": 2,  # /brochure.pdf (by extension, never requested), /download (by Content-Type)
    "too_large": 1,  # /huge
    "http_error": 1,  # /missing
    "duplicate_url": 1,  # /old-returns redirects to /returns, already found
    "duplicate_content": 1,  # /copy-of-shipping
    "egress_metadata": 1,  # /redirect-metadata -> 169.254.169.254
    "egress_private_address": 1,  # /moved-in -> www.acme.example, which resolves to 10.20.30.40
    "off_site": 1,  # /partner -> another site
    "noindex": 1,  # /draft
    "redirect_loop": 1,  # /r1 -> /r2 -> /r1
    "depth_limit": 1,  # /trail/4
    "server_error": 1,  # /flaky (a failure, counted in pages_failed)
}
NEVER_REQUESTED = frozenset({"/private/secret", "/brochure.pdf", "/trail/4", "/inside"})


def acme_site() -> dict[str, Reply]:
    pages: dict[str, Reply] = {
        "/robots.txt": Reply(
            body=b"User-agent: OtherBot\nDisallow: /\n\nUser-agent: *\nDisallow: /private/\n",
            content_type="text/plain",
        ),
        "/": page(
            "Acme Bikes",
            "Acme Bikes sells city bicycles, cargo bikes and spare parts from our shop in Springfield.",
            links=HOME_LINKS,
        ),
        "/about": page(
            "About us",
            "Acme Bikes was founded in 1998 by two mechanics who wanted sturdier city bicycles.",
            "Today twelve people assemble, sell and repair bicycles in our Springfield workshop.",
            links=("/", "/contact"),
        ),
        "/returns": page("Return policy", *RETURNS_TEXT, links=("/", "/shipping")),
        "/shipping": page("Shipping", *SHIPPING_TEXT, links=("/", "/returns")),
        "/copy-of-shipping": page("Shipping", *SHIPPING_TEXT, links=("/",)),
        "/contact": page(
            "Contact",
            "Write to hello@acme.example or call our workshop on weekdays between nine and five.",
            links=("/",),
        ),
        "/old-returns": Reply(301, headers={"location": "/returns"}, content_type=None),
        "/private/secret": page("Secret", "Internal price list that robots.txt keeps out of every crawler."),
        "/brochure.pdf": Reply(body=b"%PDF-1.7 " + b"\x00" * 1000, content_type="application/pdf"),
        "/download": Reply(body=bytes(range(256)) * 400, content_type="application/octet-stream"),
        "/huge": Reply(stream_bytes=6 * 1024 * 1024),
        "/flaky": Reply(500, b"<h1>Internal error</h1>"),
        "/loop/a": page("Loop A", "The first page of a pair that link to each other forever.", links=("/loop/b",)),
        "/loop/b": page("Loop B", "The second page of a pair that link to each other forever.", links=("/loop/a",)),
        "/redirect-metadata": Reply(
            302, headers={"location": "http://169.254.169.254/latest/meta-data/"}, content_type=None
        ),
        "/moved-in": Reply(302, headers={"location": "/PLACEHOLDER"}, content_type=None),
        "/partner": Reply(302, headers={"location": "https://partner.example/offer"}, content_type=None),
        "/draft": page(
            "Draft",
            "An unpublished draft about the winter sale, marked noindex by its author.",
            head='<meta name="robots" content="noindex">',
        ),
        "/notes.txt": Reply(
            body=b"Workshop notes: tyres are pumped for free for every customer, any day of the week.",
            content_type="text/plain; charset=utf-8",
        ),
        "/r1": Reply(302, headers={"location": "/r2"}, content_type=None),
        "/r2": Reply(302, headers={"location": "/r1"}, content_type=None),
    }
    for n in range(1, 10):
        pages[f"/trail/{n}"] = page(
            f"Archive page {n}",
            f"Archive entry number {n} of an endless calendar-style trail of pages, entry {n * 7919}.",
            links=(f"/trail/{n + 1}",),
        )
    return pages


@contextmanager
def running_acme_site() -> Iterator[FakeSite]:
    with running_site(acme_site()) as site:
        # The same-site name that resolves into a private range, with this listener's port.
        site.pages["/moved-in"] = Reply(
            302, headers={"location": f"http://{PRIVATE_ALIAS}:{site.port}/inside"}, content_type=None
        )
        yield site


# ---------------------------------------------------------------------------------------------
# The benchmark site
# ---------------------------------------------------------------------------------------------

_WORDS = [
    "bicycle",
    "wheel",
    "frame",
    "saddle",
    "pedal",
    "chain",
    "gear",
    "brake",
    "tyre",
    "spoke",
    "rim",
    "hub",
    "fork",
    "handlebar",
    "helmet",
    "light",
    "bell",
    "lock",
    "pump",
    "repair",
    "service",
    "warranty",
    "delivery",
    "order",
    "return",
    "refund",
    "payment",
    "account",
    "size",
    "colour",
    "steel",
    "aluminium",
    "carbon",
    "commute",
    "cargo",
    "trail",
    "road",
    "city",
    "weekend",
    "family",
    "child",
    "seat",
    "rack",
    "basket",
    "mudguard",
    "battery",
    "motor",
]


def generated_site(count: int, *, links_per_page: int = 6, seed: int = 7) -> dict[str, Reply]:
    """``count`` HTML pages of distinct text (about 3 KB each), every one reachable from ``/``."""
    rng = random.Random(seed)
    paths = ["/"] + [f"/p/{i}" for i in range(1, count)]
    pages: dict[str, Reply] = {"/robots.txt": Reply(body=b"User-agent: *\nDisallow:\n", content_type="text/plain")}
    for i, path in enumerate(paths):
        # A chain through every page (so all are reachable within the depth limit via the home
        # page's links) plus random cross links.
        links = [paths[(i + 1) % count]] + [rng.choice(paths) for _ in range(links_per_page - 1)]
        if i == 0:
            links += paths[1 : 1 + min(count - 1, 100)]
            links += [paths[j] for j in range(100, count, 20)]
        paragraphs = [
            " ".join(rng.choice(_WORDS) for _ in range(60)).capitalize()
            + f". Page {i} {hashlib.sha1(path.encode()).hexdigest()[:8]}."  # noqa: S324
            for _ in range(7)
        ]
        pages[path] = page(f"Page {i}", *paragraphs, links=tuple(links))
    return pages
