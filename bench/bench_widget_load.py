"""What the widget costs a customer's page: its gzipped size, and the time from the tag's load to an
interactive launcher in headless Chromium, against the same page without the widget.

    PYTHONPATH=. .venv/bin/python bench/bench_widget_load.py [--runs 30]

The demo page (shared/local/demo.py: strict CSP, the site's own stylesheet) is served twice on
loopback: as it is, and with the widget's script tag removed. Runs alternate between the two, each
in a fresh browser context (empty HTTP cache), one Chromium for all of them. Measured in the page:

* ``ready``: navigation start to the first frame after the page's ``load`` event (without the
  widget), or to the first frame after both ``load`` and the launcher being attached (with it; the
  launcher's handlers are attached before the element is, so attached is interactive);
* ``script``: for the widget, the tag's script finishing downloading (Resource Timing
  ``responseEnd``) to the launcher being attached: the widget's own parse-and-run time.

Nothing is fetched from the API until the visitor opens the panel, so no database is needed. The
script is served uncompressed here; its gzipped size is what a CDN sends.
"""

from __future__ import annotations

import argparse
import gzip
import re
import socket
import statistics
import threading
import time
from pathlib import Path

import uvicorn
from starlette.types import Receive, Scope, Send

from shared.local.demo import SITE_CSS, DemoSite

ROOT = Path(__file__).resolve().parents[1]
WIDGET = ROOT / "widget.js"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

MEASURE = """
window.__bench = {};
const frameAfter = (name) => requestAnimationFrame(() => { window.__bench[name] = performance.now(); });
addEventListener('load', () => {
  window.__bench.load = performance.now();
  if (!document.querySelector('script[data-hiredhands-key]') || window.__bench.attached) frameAfter('ready');
});
new MutationObserver((records, observer) => {
  if (!document.querySelector('hiredhands-chat')) return;
  observer.disconnect();
  window.__bench.attached = performance.now();
  const tag = performance.getEntriesByType('resource').find((e) => e.name.endsWith('/widget.js'));
  window.__bench.script = window.__bench.attached - tag.responseEnd;
  if (window.__bench.load) frameAfter('ready');
}).observe(document, { childList: true, subtree: true });
"""


class BenchSite:
    def __init__(self, port: int) -> None:
        self.demo = DemoSite(api_port=port, widget_key="hh_wk_bench", allowed=True)
        self.widget = WIDGET.read_bytes()

    async def __call__(self, scope: Scope, _receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        host = next(v.decode() for k, v in scope["headers"] if k == b"host")
        headers = [(b"cache-control", b"no-store")]
        if path in ("/with", "/without"):
            body, csp = self.demo.page(host)
            if path == "/without":
                body = re.sub(rb"<script[^>]*/widget\.js.*?</script>\n?", b"", body, flags=re.DOTALL)
            headers += [(b"content-type", b"text/html; charset=utf-8"), (b"content-security-policy", csp.encode())]
        elif path == "/widget.js":
            body = self.widget
            headers.append((b"content-type", b"text/javascript; charset=utf-8"))
        elif path == "/demo.css":
            body = SITE_CSS
            headers.append((b"content-type", b"text/css"))
        else:
            body = b""
        await send({"type": "http.response.start", "status": 200 if body else 204, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve() -> tuple[int, uvicorn.Server]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(BenchSite(port), lifespan="off", log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return port, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="page loads of each kind (alternating)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    source = WIDGET.read_bytes()
    print(f"widget.js: {len(source):,} bytes, {len(gzip.compress(source, 9)):,} bytes gzipped (-9)")
    port, server = serve()
    results: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for run in range(args.runs * 2 + 2):
            kind = ("without", "with")[run % 2]
            context = browser.new_context()
            context.add_init_script(MEASURE)
            page = context.new_page()
            page.goto(f"http://localhost:{port}/{kind}")
            page.wait_for_function("window.__bench.ready !== undefined")
            if kind == "with":
                page.get_by_role("button", name="Open chat").wait_for()
            if run >= 2:  # the first pair warms the server and the browser
                results[kind].append(page.evaluate("window.__bench"))
            context.close()
        browser.close()
    server.should_exit = True

    def median(kind: str, field: str) -> float:
        return statistics.median(r[field] for r in results[kind])

    print(f"chromium headless, {args.runs} loads of each page, alternating; medians in ms")
    print(f"{'page':<16}{'load':>10}{'ready':>10}{'script':>10}")
    print(f"{'without widget':<16}{median('without', 'load'):>10.1f}{median('without', 'ready'):>10.1f}{'':>10}")
    print(
        f"{'with widget':<16}{median('with', 'load'):>10.1f}{median('with', 'ready'):>10.1f}"
        f"{median('with', 'script'):>10.1f}"
    )
    ratio = median("with", "ready") / median("without", "ready")
    print(
        f"ready with / without: {ratio:.2f}x  (tag's script loaded -> launcher interactive: "
        f"{median('with', 'script'):.1f} ms)"
    )


if __name__ == "__main__":
    main()
