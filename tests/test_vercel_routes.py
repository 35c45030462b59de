"""vercel.json is the single routing truth: it and functions/ must agree, and every function
module must start under Vercel's Python bootstrap and AWS Lambda alike."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from shared.local.routes import cron_paths, function_file, function_modules, rewrites, static_files


def _api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Every APIRoute, looking through included routers (FastAPI wraps them; we use no prefixes)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (included := getattr(route, "original_router", None)) is not None:
            yield from _api_routes(included.routes)


def _route_regexes(app: FastAPI) -> list[re.Pattern[str]]:
    return [route.path_regex for route in _api_routes(app.routes)]


def _example_path(source: str) -> str:
    return re.sub(r":\w+\*?", "x1", source)


class TestRoutingAgreement:
    def test_every_rewrite_points_at_an_existing_function(self) -> None:
        missing = [r.source for r in rewrites() if not function_file(r.function).exists()]
        assert not missing, f"vercel.json routes to missing functions: {missing}"

    def test_every_function_has_a_route(self) -> None:
        routed = {r.function for r in rewrites()}
        unrouted = sorted(set(function_modules()) - routed)
        assert not unrouted, f"functions with no route in vercel.json: {unrouted}"

    @pytest.mark.parametrize("rewrite", rewrites(), ids=lambda r: r.source)
    def test_each_rewrite_source_is_served_by_its_function(self, rewrite) -> None:  # type: ignore[no-untyped-def]
        app = importlib.import_module(f"functions.{rewrite.function}").app
        path = _example_path(rewrite.source)
        assert any(rx.match(path) for rx in _route_regexes(app)), (
            f"{rewrite.function} declares no route for {rewrite.source}"
        )

    def test_every_declared_route_is_reachable_through_vercel_json(self) -> None:
        for name in function_modules():
            assert list(_api_routes(importlib.import_module(f"functions.{name}").app.routes)), f"{name} has no routes"
            app = importlib.import_module(f"functions.{name}").app
            sources = [r for r in rewrites() if r.function == name]
            for route in _api_routes(app.routes):
                example = re.sub(r"\{[^}]+\}", "x1", route.path)
                assert any(r.pattern.match(example) for r in sources), (
                    f"functions/{name}.py serves {route.path}, which no vercel.json rewrite reaches"
                )

    def test_crons_point_at_routed_paths(self) -> None:
        patterns = [r.pattern for r in rewrites()]
        for path in cron_paths():
            assert any(p.match(path) for p in patterns), f"cron {path} has no rewrite"

    def test_static_files_exist(self) -> None:
        for path, file in static_files().items():
            assert file.is_file(), f"vercel.json serves {path} from a missing file"


class TestVercelAndLambdaEntryPoints:
    @pytest.mark.parametrize("name", function_modules())
    def test_module_exports_app_and_lambda_handler(self, name: str) -> None:
        module = importlib.import_module(f"functions.{name}")
        assert isinstance(module.app, FastAPI)
        assert type(module.lambda_handler).__name__ == "Mangum"

    @pytest.mark.parametrize("name", function_modules())
    def test_nothing_named_handler_that_vercel_would_reject(self, name: str) -> None:
        # Vercel's bootstrap takes a module-level `handler`/`Handler` before `app` and requires a
        # BaseHTTPRequestHandler subclass; anything else stops the function from starting.
        module = importlib.import_module(f"functions.{name}")
        for attr in ("handler", "Handler"):
            value = getattr(module, attr, None)
            assert value is None or (isinstance(value, type) and issubclass(value, BaseHTTPRequestHandler)), (
                f"functions/{name}.py defines `{attr}`, which Vercel would try to start"
            )

    @pytest.mark.parametrize("name", function_modules())
    def test_function_imports_only_shared(self, name: str) -> None:
        tree = ast.parse(function_file(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("functions"), f"{name} imports another function"
                assert node.module.split(".")[0] not in {"psycopg", "httpx", "openai", "stripe"}, (
                    f"{name} reaches {node.module} directly; that belongs in shared/"
                )
            assert not isinstance(node, ast.Try), f"{name} handles errors itself; raise domain errors from shared/"
