"""Cron paths accept only Vercel Cron: it sends ``Authorization: Bearer <CRON_SECRET>``.

With no CRON_SECRET configured the path refuses every caller (production refuses to start without
one). The comparison is constant-time.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header

from shared.errors import Unauthorized
from shared.settings import get_settings


async def _require_cron_secret(authorization: Annotated[str | None, Header()] = None) -> None:
    expected = get_settings().cron_secret.get_secret_value()
    if not expected:
        raise Unauthorized("This scheduled job is not enabled here.")
    supplied = (authorization or "").encode()
    if not hmac.compare_digest(supplied, f"Bearer {expected}".encode()):
        raise Unauthorized("Only the scheduler may call this path.")


CronCaller = Annotated[None, Depends(_require_cron_secret)]
