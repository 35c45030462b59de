"""Every function loads with the garbage collector paused and resumes it once loaded
(``shared/startup.py``). Each module is loaded as Vercel's runtime loads it: from its file, without
importing the ``functions`` package first, in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "functions").rglob("[!_]*.py"))

LOAD = """
import gc, importlib.util, sys
before = sum(generation["collections"] for generation in gc.get_stats())
spec = importlib.util.spec_from_file_location({module!r}, {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
collections = sum(generation["collections"] for generation in gc.get_stats()) - before
# At most the one young-generation pass that follows when collection resumes (without the pause: ~150).
assert collections <= 1, f"the collector ran {{collections}} times while the function loaded"
assert gc.isenabled(), "the collector is still paused once the function is loaded"
assert gc.get_freeze_count() > 10_000, "what the function loaded was not frozen"
"""


def test_every_function_is_listed() -> None:
    assert {"functions/health.py", "functions/external/widget_chat.py", "functions/queues/scan_steps.py"} <= set(FILES)


@pytest.mark.parametrize("path", FILES)
def test_a_function_loads_without_collecting_and_collects_once_loaded(path: str) -> None:
    module = path.removesuffix(".py").replace("/", ".")
    env = {**os.environ, "ENVIRONMENT": "local"}
    done = subprocess.run(  # noqa: S603 - our own interpreter on our own file
        [sys.executable, "-c", LOAD.format(module=module, path=path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
