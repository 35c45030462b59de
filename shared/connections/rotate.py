"""Re-seal every connection credential under the current key: ``python -m shared.connections.rotate``.

Rotation, step by step (docs/connections.md):
1. generate a key (``python -m shared.connections.rotate --generate-key``) and put it FIRST in
   CREDENTIAL_KEYS, keeping the old ones after it; deploy. New credentials are sealed with it, old
   ones still open.
2. run this command (with the production environment: DATABASE_URL and CREDENTIAL_KEYS). It works in
   batches, each its own transaction with ``FOR UPDATE SKIP LOCKED``, so it can run beside the live
   service, be interrupted and be run again; it only touches rows sealed under another key.
3. when it reports ``remaining: 0``, drop the old key from CREDENTIAL_KEYS and deploy.

One audit-log row per organization records how many of its credentials were re-sealed. Organizations'
own model keys (bring your own key, ``secrets.model_key_credentials``) are sealed with the same keys
and re-sealed by the same run, each with an audit row ``model_key.resealed``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.connections.service import write_audit
from shared.crypto import CredentialUnreadable, Keyring, Sealed, generate_key, get_keyring
from shared.db.pool import close_pools
from shared.db.session import Database, as_service, get_database

_BATCH = """
select k.connection_id, k.org_id, k.key_id, k.nonce, k.ciphertext
  from secrets.connection_credentials as k
 where k.key_id <> %(current)s
   and not (k.connection_id = any (%(skip)s))
 order by k.connection_id
 limit %(limit)s
 for update skip locked
"""

_RESEAL = """
update secrets.connection_credentials
   set key_id = %(key_id)s, nonce = %(nonce)s, ciphertext = %(ciphertext)s
 where connection_id = %(connection_id)s and key_id = %(old_key_id)s
"""

_REMAINING = """
select (select count(*) from secrets.connection_credentials where key_id <> %(current)s)
     + (select count(*) from secrets.model_key_credentials where key_id <> %(current)s) as n
"""

_MODEL_KEY_BATCH = """
select c.org_id, k.sealed_id, c.key_id, c.nonce, c.ciphertext
  from secrets.model_key_credentials as c
  join public.model_keys as k on k.org_id = c.org_id
 where c.key_id <> %(current)s
   and not (c.org_id = any (%(skip)s))
 order by c.org_id
 limit %(limit)s
 for update of c skip locked
"""

_MODEL_KEY_RESEAL = """
update secrets.model_key_credentials
   set key_id = %(key_id)s, nonce = %(nonce)s, ciphertext = %(ciphertext)s
 where org_id = %(org_id)s and key_id = %(old_key_id)s
"""


@dataclass(slots=True)
class RotationReport:
    current_key_id: str
    resealed: int = 0
    unreadable: list[str] = field(default_factory=list)  # connection ids whose key is not configured
    remaining: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "current_key_id": self.current_key_id,
            "resealed": self.resealed,
            "unreadable": self.unreadable,
            "remaining": self.remaining,
        }


async def rotate_credentials(
    db: Database, *, keyring: Keyring | None = None, batch_size: int = 100, dry_run: bool = False
) -> RotationReport:
    keyring = keyring or get_keyring()
    report = RotationReport(current_key_id=keyring.current_key_id)
    skip: list[uuid.UUID] = []
    per_org: Counter[uuid.UUID] = Counter()
    while not dry_run:
        async with as_service(db) as conn:
            rows = await (
                await conn.execute(_BATCH, {"current": keyring.current_key_id, "skip": skip, "limit": batch_size})
            ).fetchall()
            if not rows:
                break
            for row in rows:
                sealed = Sealed(key_id=row["key_id"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"]))
                try:
                    resealed = keyring.reseal(sealed, org_id=row["org_id"], connection_id=row["connection_id"])
                except CredentialUnreadable:
                    skip.append(row["connection_id"])
                    report.unreadable.append(str(row["connection_id"]))
                    continue
                if resealed is None:  # sealed under the current key by someone else meanwhile
                    continue
                await conn.execute(
                    _RESEAL,
                    {
                        "key_id": resealed.key_id,
                        "nonce": resealed.nonce,
                        "ciphertext": resealed.ciphertext,
                        "connection_id": row["connection_id"],
                        "old_key_id": row["key_id"],
                    },
                )
                report.resealed += 1
                per_org[row["org_id"]] += 1
    model_keys = await _reseal_model_keys(db, keyring, report, batch_size) if not dry_run else []
    async with as_service(db) as conn:
        for org_id in model_keys:
            await write_audit(
                conn,
                org_id=org_id,
                action="model_key.resealed",
                connection_id=None,
                actor="credential-rotation",
                actor_user_id=None,
                details={"key_id": keyring.current_key_id},
                request_id=None,
            )
        for org_id, count in per_org.items():
            await write_audit(
                conn,
                org_id=org_id,
                action="connection.credentials_resealed",
                connection_id=None,
                actor="credential-rotation",
                actor_user_id=None,
                details={"count": count, "key_id": keyring.current_key_id},
                request_id=None,
            )
        left = await (await conn.execute(_REMAINING, {"current": keyring.current_key_id})).fetchone()
        report.remaining = int(left["n"]) if left else 0
    return report


async def _reseal_model_keys(
    db: Database, keyring: Keyring, report: RotationReport, batch_size: int
) -> list[uuid.UUID]:
    """Organizations' own model keys, bound to (org_id, sealed_id) as ``shared.gateway.keys`` opens them."""
    skip: list[uuid.UUID] = []
    resealed: list[uuid.UUID] = []
    while True:
        async with as_service(db) as conn:
            rows = await (
                await conn.execute(
                    _MODEL_KEY_BATCH, {"current": keyring.current_key_id, "skip": skip, "limit": batch_size}
                )
            ).fetchall()
            if not rows:
                return resealed
            for row in rows:
                sealed = Sealed(key_id=row["key_id"], nonce=bytes(row["nonce"]), ciphertext=bytes(row["ciphertext"]))
                try:
                    new = keyring.reseal(sealed, org_id=row["org_id"], connection_id=row["sealed_id"])
                except CredentialUnreadable:
                    skip.append(row["org_id"])
                    report.unreadable.append(f"model-key:{row['org_id']}")
                    continue
                if new is None:
                    continue
                await conn.execute(
                    _MODEL_KEY_RESEAL,
                    {
                        "key_id": new.key_id,
                        "nonce": new.nonce,
                        "ciphertext": new.ciphertext,
                        "org_id": row["org_id"],
                        "old_key_id": row["key_id"],
                    },
                )
                report.resealed += 1
                resealed.append(row["org_id"])


async def _main(args: argparse.Namespace) -> RotationReport:
    try:
        return await rotate_credentials(get_database(), batch_size=args.batch_size, dry_run=args.dry_run)
    finally:
        await close_pools()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.connections.rotate",
        description="Re-seal every connection credential under the first key of CREDENTIAL_KEYS.",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--dry-run", action="store_true", help="only count what is left to re-seal")
    parser.add_argument("--generate-key", action="store_true", help="print a new random key and exit")
    args = parser.parse_args(argv)
    if args.generate_key:
        sys.stdout.write(generate_key() + "\n")
        return 0
    report = asyncio.run(_main(args))
    sys.stdout.write(json.dumps(report.as_dict()) + "\n")
    return 1 if report.unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
