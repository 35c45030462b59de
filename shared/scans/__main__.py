"""Run one worker invocation against DATABASE_URL, as the cron would: ``python -m shared.scans``."""

from __future__ import annotations

import asyncio
import json
import sys

from shared.db.pool import close_pools
from shared.db.session import get_database
from shared.scans.worker import run_scans


async def _main() -> int:
    try:
        report = await run_scans(get_database())
    finally:
        await close_pools()
    sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(_main()))
