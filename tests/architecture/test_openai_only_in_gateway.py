"""Only the gateway may talk to a model, and only when a model is called.

Every module of ``shared/`` and ``functions/`` is parsed (not imported) and each ``import`` of
``openai`` (or a submodule) is located: one module, ``shared/gateway/provider.py``, may import it,
and there only inside functions, so a cold start that never calls a model never loads the SDK.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("shared", "functions")
GATEWAY_PROVIDER = "shared/gateway/provider.py"


def _python_files() -> list[Path]:
    return sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))


def _imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        in {"import_module", "__import__"}
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def _is_openai(module: str) -> bool:
    return module == "openai" or module.startswith("openai.")


def _openai_imports(path: Path) -> list[tuple[int, bool]]:
    return openai_imports(path.read_text(), str(path))


def openai_imports(source: str, filename: str = "<source>") -> list[tuple[int, bool]]:
    """(line, at module level) for every import of openai in ``source``; TYPE_CHECKING blocks excluded."""
    tree = ast.parse(source, filename=filename)
    found: list[tuple[int, bool]] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            for branch in node.orelse:
                visit(branch, module_level)
            return
        if any(_is_openai(module) for module in _imported_modules(node)):
            found.append((getattr(node, "lineno", 0), module_level))
        inside = module_level and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, True)
    return found


def test_the_scan_sees_the_code() -> None:
    files = {path.relative_to(ROOT).as_posix() for path in _python_files()}
    assert GATEWAY_PROVIDER in files
    assert _openai_imports(ROOT / GATEWAY_PROVIDER), "the provider imports openai, so the scan can find it"


def test_the_scan_finds_every_way_of_importing_the_sdk() -> None:
    source = """
import os
import openai
from openai.types import chat
import importlib
if TYPE_CHECKING:
    from openai import AsyncOpenAI
def lazy():
    from openai import AsyncOpenAI
    return importlib.import_module("openai.types")
"""
    assert openai_imports(source) == [(3, True), (4, True), (9, False), (10, False)]


def test_no_module_but_the_gateway_provider_imports_openai() -> None:
    offenders = [
        f"{path.relative_to(ROOT).as_posix()}:{line}"
        for path in _python_files()
        if path.relative_to(ROOT).as_posix() != GATEWAY_PROVIDER
        for line, _ in _openai_imports(path)
    ]
    assert offenders == [], f"model calls go through shared.gateway; openai imported at {offenders}"


def test_the_gateway_imports_openai_only_inside_functions() -> None:
    at_module_level = [line for line, module_level in _openai_imports(ROOT / GATEWAY_PROVIDER) if module_level]
    assert at_module_level == [], f"import openai inside the function that calls it (lines {at_module_level})"


def test_importing_the_gateway_does_not_load_the_sdk() -> None:
    probe = "import sys, shared.gateway; print('openai' in sys.modules)"
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
