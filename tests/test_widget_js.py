"""widget.js as a file: its budget, what it must never contain, and how it is served.

What it does in a browser is tests/browser/; these hold without one.
"""

from __future__ import annotations

import gzip
import re
import secrets

import httpx
import psycopg
import pytest

from shared.local.demo import DemoSite, allow_demo_origins, demo_origins
from shared.local.routes import ROOT, LocalRouter, load_config

WIDGET = ROOT / "widget.js"
SOURCE = WIDGET.read_text()
CODE = re.sub(r"/\*.*?\*/|^[ \t]*//[^\n]*", "", SOURCE, flags=re.DOTALL | re.MULTILINE)  # comments out


class TestTheFile:
    def test_fits_the_12_kb_gzipped_budget(self) -> None:
        size = len(gzip.compress(SOURCE.encode(), 9))
        assert size <= 12 * 1024, f"widget.js is {size} bytes gzipped; the budget is 12 KB"

    @pytest.mark.parametrize(
        "construct",
        [
            r"\beval\s*\(",
            r"new\s+Function\b",
            r"\binnerHTML\b",
            r"\bouterHTML\b",
            r"insertAdjacentHTML",
            r"document\.write",
            r"\bcookie\b",
            r"setAttribute\(\s*['\"](on|style)",
            r"\.cssText\b",
            r"setTimeout\(\s*['\"`]",
            r"\blocation\.href\s*=",
            r"<style\b",
        ],
    )
    def test_uses_nothing_a_strict_csp_or_a_reviewer_would_refuse(self, construct: str) -> None:
        assert not re.search(construct, CODE), f"widget.js uses {construct}"

    def test_talks_to_no_other_host_than_the_one_it_was_loaded_from(self) -> None:
        # The only absolute URL in the code is the SVG namespace, which is a name, never fetched.
        assert set(re.findall(r"https?://[^\s'\"`)]+", CODE)) == {"http://www.w3.org/2000/svg"}


class TestServing:
    def test_vercel_builds_it_as_a_static_file_with_a_cache_of_minutes(self) -> None:
        config = load_config()
        assert {"src": "widget.js", "use": "@vercel/static"} in config["builds"]
        [rule] = [rule for rule in config["headers"] if rule["source"] == "/widget.js"]
        cache = next(h["value"] for h in rule["headers"] if h["key"] == "Cache-Control")
        max_age = int(re.search(r"max-age=(\d+)", cache).group(1))  # type: ignore[union-attr]
        stale = int(re.search(r"stale-while-revalidate=(\d+)", cache).group(1))  # type: ignore[union-attr]
        assert max_age + stale <= 600, "a fix must reach sites within minutes"

    async def test_the_local_server_serves_it_with_the_headers_of_vercel_json(self) -> None:
        transport = httpx.ASGITransport(app=LocalRouter())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            response = await client.get("/widget.js")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/javascript; charset=utf-8"
        assert response.headers["cache-control"] == "public, max-age=300, stale-while-revalidate=60"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.text == SOURCE


class TestDemoSite:
    async def test_the_page_loads_the_widget_from_the_other_loopback_name_under_a_strict_csp(self) -> None:
        site = DemoSite(api_port=8000, widget_key="hh_wk_demo", allowed=True, refused_port=8001)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=site), base_url="http://localhost:8000") as c:
            page = await c.get("/")
        assert page.status_code == 200
        assert '<script src="http://127.0.0.1:8000/widget.js" data-hiredhands-key="hh_wk_demo" async>' in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src http://127.0.0.1:8000;" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert "require-trusted-types-for 'script'" in csp

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=site), base_url="http://127.0.0.1:8000") as c:
            swapped = await c.get("/")
        assert 'src="http://localhost:8000/widget.js"' in swapped.text

    def test_the_demo_agent_allows_the_demo_origins_and_keeps_its_own(self, admin_url: str) -> None:
        key = "hh_wk_" + secrets.token_hex(24)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            org = conn.execute("insert into public.organizations (name) values ('demo test') returning id").fetchone()
            assert org is not None
            conn.execute(
                "insert into public.agents (org_id, name, system_prompt, widget_enabled, widget_key_hash,"
                " widget_key_hint, allowed_origins) values (%s, 'demo', 'x', true, sha256(convert_to(%s, 'UTF8')),"
                " right(%s, 4), array['https://shop.example'])",
                (org[0], key, key),
            )
            allow_demo_origins(admin_url, key, 8123)
            allow_demo_origins(admin_url, key, 8123)  # idempotent: a restart adds nothing twice
            row = conn.execute(
                "select allowed_origins from public.agents where widget_key_hash = sha256(convert_to(%s, 'UTF8'))",
                (key,),
            ).fetchone()
        assert row is not None
        assert sorted(row[0]) == sorted(["https://shop.example", *demo_origins(8123)])
