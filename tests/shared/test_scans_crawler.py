"""URL normalisation, the same-site rule, robots.txt and extraction, without a database.

Network behaviour is exercised against the loopback site (tests/fakes/site.py) through the
egress guard; nothing of ours is patched.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.scans.crawler import Crawler, Page, Skipped, has_binary_extension, normalise, site_of
from shared.scans.extract import extract_html, extract_plain
from shared.scans.schemas import USER_AGENT_TOKEN, ScanEnvironment
from tests.fakes.site import FakeSite, Reply, page, running_site


class TestNormalise:
    @pytest.mark.parametrize(
        ("href", "expected"),
        [
            ("HTTP://Acme.Example:80/a/../b", "http://acme.example/b"),
            ("https://acme.example:443", "https://acme.example/"),
            ("https://acme.example/page#section", "https://acme.example/page"),
            ("https://acme.example/?b=2&utm_source=x&a=1&fbclid=y", "https://acme.example/?a=1&b=2"),
            ("https://acme.example/?utm_medium=mail", "https://acme.example/"),
            ("https://acme.example/a b", "https://acme.example/a%20b"),
            ("https://acme.example:8443/x", "https://acme.example:8443/x"),
        ],
    )
    def test_one_spelling_per_page(self, href: str, expected: str) -> None:
        assert normalise(href) == expected

    def test_relative_links_resolve_against_the_page(self) -> None:
        assert normalise("../shipping?x=1", "https://acme.example/help/returns") == "https://acme.example/shipping?x=1"
        assert normalise("//acme.example/a", "https://acme.example/") == "https://acme.example/a"

    @pytest.mark.parametrize(
        "href",
        [
            "mailto:hi@acme.example",
            "javascript:alert(1)",
            "tel:+15550100",
            "#top",
            "",
            "ftp://acme.example/f",
            "https://user:pw@acme.example/",
            "data:text/html,hi",
        ],
    )
    def test_what_is_not_a_web_page_is_dropped(self, href: str) -> None:
        assert normalise(href, "https://acme.example/") is None


class TestSameSite:
    def test_www_is_folded(self) -> None:
        assert site_of("https://www.acme.example/a") == site_of("http://acme.example/b")

    def test_other_subdomains_are_other_sites(self) -> None:
        assert site_of("https://blog.acme.example/") != site_of("https://acme.example/")
        assert site_of("https://acme.example.evil.example/") != site_of("https://acme.example/")

    def test_another_port_is_another_site(self) -> None:
        assert site_of("http://acme.example:8080/") != site_of("http://acme.example/")

    @pytest.mark.parametrize(
        ("url", "binary"),
        [
            ("https://a.example/brochure.PDF", True),
            ("https://a.example/logo.png?v=2", True),
            ("https://a.example/page.html", False),
            ("https://a.example/notes.txt", False),
            ("https://a.example/v1.2/docs", False),
            ("https://a.example/", False),
        ],
    )
    def test_binary_extensions(self, url: str, binary: bool) -> None:
        assert has_binary_extension(url) is binary


class TestExtract:
    def test_main_text_title_and_links(self) -> None:
        html = page("Return policy", "Bikes may be returned within 30 days.", links=("/", "/shipping")).body
        extracted = extract_html(html, "text/html", url="https://acme.example/returns")
        assert extracted.title == "Return policy"
        assert "returned within 30 days" in extracted.text
        assert "All rights reserved" not in extracted.text
        assert extracted.links == ["/", "/shipping"]
        assert not extracted.noindex

    def test_meta_robots_noindex_and_nofollow(self) -> None:
        html = page("Draft", "Text.", links=("/x",), head='<meta name="ROBOTS" content="noindex, nofollow">').body
        extracted = extract_html(html, "text/html", url="https://acme.example/draft")
        assert extracted.noindex
        assert extracted.nofollow
        assert extracted.links == []
        assert extracted.text == ""

    def test_charset_from_the_header_or_the_document(self) -> None:
        body = "<html><head><title>Café</title></head><body><p>Crème brûlée at the café.</p></body></html>"
        latin = extract_html(body.encode("latin-1"), "text/html; charset=ISO-8859-1", url="https://a.example/")
        assert "Crème brûlée" in latin.text
        meta = '<html><head><meta charset="latin-1"><title>x</title></head><body><p>Crème</p></body></html>'
        assert "Crème" in extract_html(meta.encode("latin-1"), "text/html", url="https://a.example/").text

    def test_base_href_is_reported(self) -> None:
        html = b'<html><head><base href="/docs/"></head><body><a href="intro">Intro</a></body></html>'
        extracted = extract_html(html, "text/html", url="https://a.example/")
        assert (extracted.base, extracted.links) == ("/docs/", ["intro"])

    def test_an_empty_document_has_no_text(self) -> None:
        assert extract_html(b"", "text/html", url="https://a.example/").text == ""

    def test_plain_text_is_taken_as_it_is(self) -> None:
        assert extract_plain(b"  Opening hours\nnine to five \x00", "text/plain").text == "Opening hours\nnine to five"


@pytest.fixture(scope="module")
def little_site() -> Iterator[FakeSite]:
    pages = {
        "/robots.txt": Reply(
            body=b"User-agent: *\nDisallow: /\n\nUser-agent: HiredHandsBot\nDisallow: /admin\nCrawl-delay: 2\n",
            content_type="text/plain",
        ),
        "/": page("Home", "Welcome."),
        "/admin": page("Admin", "Keep out."),
        "/hop": Reply(302, headers={"location": "/"}, content_type=None),
        "/slow": Reply(200, b"<p>slow</p>"),
        "/typeless": Reply(200, b"<!doctype html><html><body><p>No content type.</p></body></html>", content_type=None),
        "/typeless-binary": Reply(200, b"\x89PNG\r\n", content_type=None),
    }
    with running_site(pages) as site:
        yield site


class TestCrawler:
    def env(self, site: FakeSite, *, max_crawl_delay: float = 0.0) -> ScanEnvironment:
        return ScanEnvironment(
            policy=site.policy(),
            resolver=site.resolver(),
            politeness_seconds=0,
            max_crawl_delay_seconds=max_crawl_delay,
        )

    async def test_our_own_robots_group_wins_and_its_crawl_delay_is_kept(self, little_site: FakeSite) -> None:
        async with Crawler(
            self.env(little_site, max_crawl_delay=10), start_url=little_site.url("/"), agent_token=USER_AGENT_TOKEN
        ) as crawler:
            assert await crawler.robots_allow(little_site.url("/")) is None
            assert await crawler.robots_allow(little_site.url("/admin")) == "robots"
            assert crawler.delay(little_site.url("/")) == 2.0, "urllib.robotparser reads whole seconds only"

    async def test_a_redirect_to_a_page_already_found_is_a_duplicate(self, little_site: FakeSite) -> None:
        async with Crawler(
            self.env(little_site), start_url=little_site.url("/"), agent_token=USER_AGENT_TOKEN
        ) as crawler:
            outcome = await crawler.fetch(little_site.url("/hop"), seen={little_site.url("/")})
            assert outcome == Skipped("duplicate_url", [])
            followed = await crawler.fetch(little_site.url("/hop"), seen=set())
            assert isinstance(followed, Page)
            assert (followed.url, followed.hops) == (little_site.url("/"), [little_site.url("/")])

    async def test_a_missing_content_type_is_sniffed(self, little_site: FakeSite) -> None:
        async with Crawler(
            self.env(little_site), start_url=little_site.url("/"), agent_token=USER_AGENT_TOKEN
        ) as crawler:
            assert isinstance(await crawler.fetch(little_site.url("/typeless"), seen=set()), Page)
            assert await crawler.fetch(little_site.url("/typeless-binary"), seen=set()) == Skipped("not_html", [])

    async def test_a_site_on_a_port_the_policy_refuses_is_never_contacted(self, little_site: FakeSite) -> None:
        env = ScanEnvironment(policy=little_site.policy(), resolver=little_site.resolver(), politeness_seconds=0)
        async with Crawler(env, start_url="http://acme.example:1/", agent_token=USER_AGENT_TOKEN) as crawler:
            # robots.txt is refused by the guard before any connection; every page of that origin with it.
            assert await crawler.fetch("http://acme.example:1/", seen=set()) == Skipped("egress_port", [])
