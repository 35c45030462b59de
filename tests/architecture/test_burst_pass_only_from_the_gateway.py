"""A ``BurstPass`` lets a model call skip its own burst-limit count, so only the gateway may make
one, in ``admit_burst``, after Redis has counted the calls. Every module of ``shared/`` and
``functions/`` is parsed (not imported) and every call of a name ``BurstPass`` is located."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_SERVICE = "shared/gateway/service.py"


def constructions(source: str) -> list[tuple[int, str]]:
    """(line, enclosing function) of every ``BurstPass(...)`` or ``<x>.BurstPass(...)`` call."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call):
            callee = node.func
            name = (
                callee.attr if isinstance(callee, ast.Attribute) else callee.id if isinstance(callee, ast.Name) else ""
            )
            if name == "BurstPass":
                found.append((node.lineno, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return found


def test_only_admit_burst_makes_a_burst_pass() -> None:
    made = {
        str(path.relative_to(ROOT)): constructions(path.read_text())
        for folder in ("shared", "functions")
        for path in sorted((ROOT / folder).rglob("*.py"))
    }
    elsewhere = {path: found for path, found in made.items() if found and path != GATEWAY_SERVICE}

    assert elsewhere == {}
    assert [function for _, function in made[GATEWAY_SERVICE]] == ["admit_burst"]


def test_the_scan_finds_both_spellings() -> None:
    source = "from shared import gateway\ndef f():\n    gateway.BurstPass(1, 2)\n    BurstPass(1, 2)\n"
    assert constructions(source) == [(3, "f"), (4, "f")]
