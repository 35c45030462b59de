"""The widget's origin policy: exact origins only, fail closed, CORS headers only for what is allowed."""

from __future__ import annotations

import pytest

from shared.widget.cors import OriginDecision, decide, normalize_origin
from shared.widget.errors import OriginNotAllowed


class TestNormalizeOrigin:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("https://shop.example", "https://shop.example"),
            ("HTTPS://Shop.Example", "https://shop.example"),
            ("https://shop.example/", "https://shop.example"),
            ("https://shop.example:443", "https://shop.example"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("http://127.0.0.1:80", "http://127.0.0.1"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("https://shop.example/path", None),
            ("https://shop.example?q=1", None),
            ("https://user:pw@shop.example", None),
            ("ftp://shop.example", None),
            ("null", None),
            ("", None),
            ("shop.example", None),
            ("https://shop.example:99999", None),
            ("https://" + "a" * 3000 + ".example", None),
        ],
    )
    def test_cases(self, value: str, expected: str | None) -> None:
        assert normalize_origin(value) == expected


class TestDecide:
    ALLOWED = ("https://shop.example", "http://localhost:3000/")

    def test_an_allowed_origin_gets_cors_headers_for_itself_only(self) -> None:
        decision = decide("https://SHOP.example", self.ALLOWED)

        assert decision == OriginDecision("https://shop.example")
        headers = decision.headers()
        assert headers["Access-Control-Allow-Origin"] == "https://shop.example"
        assert headers["Vary"] == "Origin"
        assert "Access-Control-Allow-Credentials" not in headers
        assert "retry-after" in headers["Access-Control-Expose-Headers"]

    def test_a_trailing_slash_in_the_configuration_is_forgiven(self) -> None:
        assert decide("http://localhost:3000", self.ALLOWED).origin == "http://localhost:3000"

    @pytest.mark.parametrize(
        "origin",
        [
            "https://evil.example",
            "https://shop.example.evil.example",
            "https://evilshop.example",
            "http://shop.example",
            "https://shop.example:8443",
            "null",
            "https://*.example",
        ],
    )
    def test_anything_else_is_refused(self, origin: str) -> None:
        with pytest.raises(OriginNotAllowed):
            decide(origin, self.ALLOWED)

    def test_no_wildcards_in_the_configuration_either(self) -> None:
        with pytest.raises(OriginNotAllowed):
            decide("https://a.shop.example", ["https://*.shop.example", "*"])

    def test_an_empty_list_allows_no_website(self) -> None:
        with pytest.raises(OriginNotAllowed):
            decide("https://shop.example", [])

    def test_no_origin_is_served_without_cors_only_while_no_website_is_allowed(self) -> None:
        assert decide(None, []).headers() == {"Vary": "Origin"}
        with pytest.raises(OriginNotAllowed):
            decide(None, self.ALLOWED)

    def test_preflight_headers_name_the_methods_and_headers_the_widget_uses(self) -> None:
        headers = decide("https://shop.example", self.ALLOWED).preflight_headers()

        assert set(headers["Access-Control-Allow-Methods"].replace(" ", "").split(",")) == {"GET", "POST", "OPTIONS"}
        assert set(headers["Access-Control-Allow-Headers"].replace(" ", "").split(",")) == {
            "authorization",
            "content-type",
        }
        assert int(headers["Access-Control-Max-Age"]) > 0
