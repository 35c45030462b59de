"""vercel.json, read the way the local server and the route tests need it.

vercel.json is the single routing truth: the local server mounts each function at exactly the
paths the rewrites give it, and a rewritten request keeps the URL the browser asked for, as on
Vercel, so each function's own routes are declared with their public paths.
"""

from __future__ import annotations

import importlib
import json
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[2]
VERCEL_JSON = ROOT / "vercel.json"
FUNCTIONS_DIR = ROOT / "functions"
SUBSCRIBERS_DIR = "queues"


@dataclass(frozen=True)
class Rewrite:
    source: str
    function: str  # module name under functions/, dotted for a function in a subfolder ("external.widget_chat")

    @property
    def pattern(self) -> re.Pattern[str]:
        # Vercel's path-to-regexp subset we use: ":name" is one segment, ":name*" any number.
        regex = re.sub(r":(\w+)\*", r"(?P<\1>.*)", self.source)
        regex = re.sub(r":(\w+)", r"(?P<\1>[^/]+)", regex)
        return re.compile(f"^{regex}$")


def load_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(VERCEL_JSON.read_text())
    return config


def rewrites() -> list[Rewrite]:
    result = []
    for rule in load_config().get("rewrites", []):
        destination = rule["destination"]
        match = re.fullmatch(r"/functions/([\w/]+)\.py", destination)
        if not match:
            raise ValueError(f"vercel.json rewrite to something other than a function: {destination}")
        result.append(Rewrite(source=rule["source"], function=match.group(1).replace("/", ".")))
    return result


def cron_paths() -> list[str]:
    return [cron["path"] for cron in load_config().get("crons", [])]


def static_files() -> dict[str, Path]:
    files = {}
    for build in load_config().get("builds", []):
        if build["use"] == "@vercel/static":
            files["/" + build["src"]] = ROOT / build["src"]
    return files


def static_headers(path: str) -> dict[str, str]:
    """The headers vercel.json's ``headers`` rules give ``path`` (exact sources only: all we use)."""
    headers: dict[str, str] = {}
    for rule in load_config().get("headers", []):
        if rule["source"] == path:
            headers.update({item["key"]: item["value"] for item in rule["headers"]})
    return headers


def content_type(file: Path) -> str:
    guessed = mimetypes.guess_type(file.name)[0] or "text/plain"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") or guessed.endswith("javascript") else guessed


def function_modules() -> list[str]:
    """Every function, as its module name under functions/ (a subfolder has its own dependencies)."""
    # The files vercel.json's builds make HTTP functions of (queue subscribers are built from pyproject.toml).
    sources = [b["src"] for b in load_config().get("builds", []) if b["src"].endswith(".py")]
    files = {p for src in sources for p in ROOT.glob(src)}
    return sorted(".".join(p.relative_to(FUNCTIONS_DIR).with_suffix("").parts) for p in files)


def function_file(module: str) -> Path:
    return FUNCTIONS_DIR.joinpath(*module.split(".")).with_suffix(".py")


class LocalRouter:
    """One ASGI app serving every function at its vercel.json paths, plus the static files, with the
    headers vercel.json gives them; and, when one is given, a site at every other path (the demo)."""

    def __init__(self, site: ASGIApp | None = None) -> None:
        self._routes = [(r.pattern, self._app(r.function)) for r in rewrites()]
        self._static = {path: self._static_response(path, file) for path, file in static_files().items()}
        self._site = site

    @staticmethod
    def _static_response(path: str, file: Path) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        body = file.read_bytes()
        headers = {"content-type": content_type(file), **static_headers(path), "content-length": str(len(body))}
        return body, [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    @staticmethod
    def _app(function: str) -> ASGIApp:
        app: ASGIApp = importlib.import_module(f"functions.{function}").app
        return app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
                await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope.get("path", "")
        if scope["type"] == "http" and path in self._static:
            body, headers = self._static[path]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        for pattern, app in self._routes:
            if pattern.match(path):
                await app(scope, receive, send)
                return
        if self._site is not None:
            await self._site(scope, receive, send)
            return
        body = b'{"type":"about:blank","title":"Not found","status":404}'
        headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": body})
