"""The demo site of ``hiredhands dev``: a customer's page with the widget on it, and one the agent refuses.

On a real site the page and the widget's API are different origins (``https://shop.example`` and
the deployment), and the browser sends ``Origin`` with every request the widget makes. Locally
both live on one machine, so the page loads the widget from the *other* loopback name: a page at
``http://localhost:8000/`` gets ``http://127.0.0.1:8000/widget.js`` and the reverse. The two
names are distinct origins, so the local demo exercises the same CORS and origin policy as
production. The refused page is served on a second port that is in no agent's allowed origins.

Every page is served under a strict Content-Security-Policy (no inline script or style, Trusted
Types required) and with a stylesheet of careless site-wide rules, so the demo also shows the
widget working under a customer's CSP and unaffected by the customer's CSS.
"""

from __future__ import annotations

import html

import psycopg
from starlette.types import Receive, Scope, Send

from shared.widget.keys import hash_key

LOOPBACK_NAMES = ("localhost", "127.0.0.1")

# Rules that real sites have and that would break a widget living in the page's own DOM.
SITE_CSS = b"""* { font-family: Georgia, serif; line-height: 2; letter-spacing: .05em; }
body { max-width: 42rem; margin: 3rem auto; padding: 0 1rem; color: #222; background: #fdfbf6; }
button { background: hotpink; color: lime; border-radius: 0; padding: 2rem; }
div { border: 3px dashed orange; margin: 1rem; }
textarea, form { display: none; }
"""


def other_loopback_name(host_header: str) -> str:
    """The loopback name the page is *not* on: the widget's origin for a page on this host."""
    hostname = host_header.rsplit(":", 1)[0] if not host_header.startswith("[") else host_header
    return "127.0.0.1" if hostname == "localhost" else "localhost"


def demo_origins(port: int) -> list[str]:
    """The origins the demo pages on ``port`` have: what the demo agent must allow."""
    return [f"http://{name}:{port}" for name in LOOPBACK_NAMES]


def allow_demo_origins(admin_url: str, widget_key: str, port: int) -> None:
    """Add the demo site's origins to the demo agent's allowed origins (local database only)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            """
            update public.agents
               set allowed_origins = array(select distinct unnest(allowed_origins || %(origins)s::text[]))
             where widget_key_hash = %(key_hash)s
            """,
            {"origins": demo_origins(port), "key_hash": hash_key(widget_key)},
        )


def page_csp(widget_origin: str) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {widget_origin}",
            f"connect-src {widget_origin}",
            "style-src 'self'",
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
            "trusted-types 'none'",
        ]
    )


class DemoSite:
    """An ASGI app: ``/`` is a page with the widget (``widget_key``, loaded from port ``api_port``)."""

    def __init__(self, *, api_port: int, widget_key: str, allowed: bool, refused_port: int | None = None) -> None:
        self.api_port = api_port
        self.widget_key = widget_key
        self.allowed = allowed
        self.refused_port = refused_port

    def page(self, host_header: str) -> tuple[bytes, str]:
        widget_origin = f"http://{other_loopback_name(host_header)}:{self.api_port}"
        here = html.escape(f"http://{host_header}")
        if self.allowed:
            heading = "Demo Co: the widget on an allowed website"
            text = (
                f"This page plays a customer's website at {here}. The chat button in the corner is the "
                f"widget, loaded from {html.escape(widget_origin)} with the demo agent's key."
            )
            if self.refused_port is not None:
                refused = html.escape(f"http://{host_header.rsplit(':', 1)[0]}:{self.refused_port}/")
                text += f' <a href="{refused}">{refused}</a> is a website the agent does not allow.'
        else:
            heading = "A website the agent does not allow"
            text = (
                f"{here} is not in the demo agent's allowed origins: the widget says chat is unavailable, "
                "and the API answers it nothing."
            )
        body = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(heading)}</title>
<link rel="stylesheet" href="/demo.css">
</head>
<body>
<h1>{html.escape(heading)}</h1>
<p>{text}</p>
<p><button type="button">A button of the site's own</button></p>
<script src="{html.escape(widget_origin)}/widget.js" data-hiredhands-key="{html.escape(self.widget_key)}" async>
</script>
</body>
</html>
"""
        return body.encode(), page_csp(widget_origin)

    async def __call__(self, scope: Scope, _receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), f"localhost:{self.api_port}")
        headers = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
        if path == "/":
            body, csp = self.page(host)
            headers += [(b"content-type", b"text/html; charset=utf-8"), (b"content-security-policy", csp.encode())]
            status = 200
        elif path == "/demo.css":
            body, status = SITE_CSS, 200
            headers.append((b"content-type", b"text/css; charset=utf-8"))
        elif path == "/favicon.ico":
            body, status = b"", 204
        else:
            body, status = b"Not found", 404
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
