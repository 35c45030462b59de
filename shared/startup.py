"""A function's cold start: every module under ``functions/`` imports ``modules_loaded`` from here
before anything else (ruff's isort keeps it first: the ``startup`` section in pyproject.toml) and
calls it last (``tests/functions/test_startup.py`` checks each).

Loading a function allocates a few hundred thousand objects that live as long as the process
(FastAPI, pydantic, our modules) and almost no garbage, yet the cyclic garbage collector would walk
them all several times on the way: about 40 ms of CPU in every cold start. It is off from here until
the function calls ``modules_loaded``.
"""

from __future__ import annotations

import gc

gc.disable()


def modules_loaded() -> None:
    """What exists now lives as long as the process: freeze it out of the collector's way (no later
    full collection walks it again), then resume collecting what requests allocate."""
    gc.freeze()
    gc.enable()
