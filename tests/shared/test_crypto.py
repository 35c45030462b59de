"""Credential sealing (AES-256-GCM with key ids) and re-sealing under a new key."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg.rows import DictRow

from shared.connections.rotate import main as rotate_main
from shared.connections.rotate import rotate_credentials
from shared.connections.schemas import Credential
from shared.connections.service import open_credential, seal_credential
from shared.crypto import (
    KEY_BYTES,
    CredentialKeyError,
    CredentialUnreadable,
    Keyring,
    Sealed,
    get_keyring,
    parse_keys,
)
from tests.conftest import TransactionDatabase
from tests.factories import create_org

Connection = AsyncConnection[DictRow]
ROOT = Path(__file__).resolve().parents[2]


def key() -> bytes:
    return os.urandom(KEY_BYTES)


def spec(*pairs: tuple[str, bytes]) -> str:
    return ",".join(f"{kid}:{base64.b64encode(k).decode()}" for kid, k in pairs)


ORG, CONNECTION = uuid.uuid4(), uuid.uuid4()


class TestSealing:
    def test_round_trip_with_a_fresh_nonce_each_time(self) -> None:
        ring = Keyring([("k1", key())])
        first = ring.seal(b"xoxb-secret", org_id=ORG, connection_id=CONNECTION)
        second = ring.seal(b"xoxb-secret", org_id=ORG, connection_id=CONNECTION)
        assert first.nonce != second.nonce
        assert first.ciphertext != second.ciphertext
        assert b"xoxb-secret" not in first.ciphertext
        assert ring.open(first, org_id=ORG, connection_id=CONNECTION) == b"xoxb-secret"
        assert first.key_id == "k1"

    @pytest.mark.parametrize(
        "binding",
        [{"org_id": uuid.uuid4(), "connection_id": CONNECTION}, {"org_id": ORG, "connection_id": uuid.uuid4()}],
        ids=["other organization", "other connection"],
    )
    def test_ciphertext_moved_to_another_row_does_not_open(self, binding: dict[str, Any]) -> None:
        ring = Keyring([("k1", key())])
        sealed = ring.seal(b"token", org_id=ORG, connection_id=CONNECTION)
        with pytest.raises(CredentialUnreadable):
            ring.open(sealed, **binding)

    def test_tampering_is_detected(self) -> None:
        ring = Keyring([("k1", key())])
        sealed = ring.seal(b"token", org_id=ORG, connection_id=CONNECTION)
        flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
        with pytest.raises(CredentialUnreadable):
            ring.open(Sealed("k1", sealed.nonce, flipped), org_id=ORG, connection_id=CONNECTION)

    def test_unknown_key_id_is_unreadable_not_a_crash(self) -> None:
        sealed = Keyring([("old", key())]).seal(b"token", org_id=ORG, connection_id=CONNECTION)
        with pytest.raises(CredentialUnreadable, match="old"):
            Keyring([("new", key())]).open(sealed, org_id=ORG, connection_id=CONNECTION)

    def test_wrong_key_under_the_same_id_fails_authentication(self) -> None:
        sealed = Keyring([("k1", key())]).seal(b"token", org_id=ORG, connection_id=CONNECTION)
        with pytest.raises(CredentialUnreadable):
            Keyring([("k1", key())]).open(sealed, org_id=ORG, connection_id=CONNECTION)

    def test_reprs_carry_no_key_or_ciphertext(self) -> None:
        raw = key()
        ring = Keyring([("k1", raw)])
        sealed = ring.seal(b"token", org_id=ORG, connection_id=CONNECTION)
        assert repr(raw) not in repr(ring)
        assert base64.b64encode(raw).decode() not in repr(ring)
        assert repr(sealed.ciphertext) not in repr(sealed)
        assert repr(Credential(token="ghp_abcdefghijklmnop")).count("ghp_") == 0


class TestRotation:
    def test_new_key_first_seals_while_old_keys_still_open(self) -> None:
        old, new = key(), key()
        sealed_old = parse_keys(spec(("k1", old))).seal(b"token", org_id=ORG, connection_id=CONNECTION)
        ring = parse_keys(spec(("k2", new), ("k1", old)))
        assert ring.current_key_id == "k2"
        assert ring.open(sealed_old, org_id=ORG, connection_id=CONNECTION) == b"token"
        resealed = ring.reseal(sealed_old, org_id=ORG, connection_id=CONNECTION)
        assert resealed is not None
        assert resealed.key_id == "k2"
        assert parse_keys(spec(("k2", new))).open(resealed, org_id=ORG, connection_id=CONNECTION) == b"token"
        assert ring.reseal(resealed, org_id=ORG, connection_id=CONNECTION) is None


class TestKeyConfiguration:
    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("", "no key"),
            ("k1", "'<key_id>:<base64 key>'"),
            ("k1:not base64!!", "not valid base64"),
            ("k1:" + base64.b64encode(b"short").decode(), "must be 32 bytes"),
            ("bad id:" + base64.b64encode(b"x" * 32).decode(), "key ids"),
        ],
    )
    def test_malformed_keys_are_refused_without_echoing_them(self, value: str, message: str) -> None:
        with pytest.raises(CredentialKeyError, match=message.replace("(", r"\(")) as raised:
            parse_keys(value)
        encoded = value.partition(":")[2]
        if encoded:
            assert encoded not in str(raised.value)

    def test_duplicate_key_ids_are_refused(self) -> None:
        with pytest.raises(CredentialKeyError, match="twice"):
            parse_keys(spec(("k1", key()), ("k1", key())))

    def test_the_environment_keyring_is_the_tests_key(self) -> None:
        assert get_keyring().current_key_id == "k1"


async def _seal_row(db: Connection, org: dict[str, Any], ring: Keyring, secret: str) -> uuid.UUID:
    connection_id = uuid.uuid4()
    await db.execute("reset role")
    await db.execute(
        "insert into public.connections (id, org_id, kind, name) values (%s, %s, 'github', 'repo')",
        (connection_id, org["id"]),
    )
    sealed = ring.seal(f'{{"token": "{secret}"}}'.encode(), org_id=org["id"], connection_id=connection_id)
    await db.execute(
        "insert into secrets.connection_credentials (connection_id, org_id, key_id, nonce, ciphertext)"
        " values (%s, %s, %s, %s, %s)",
        (connection_id, org["id"], sealed.key_id, sealed.nonce, sealed.ciphertext),
    )
    return connection_id


class TestRotateCommand:
    async def test_reseals_every_row_under_the_new_key_and_audits_it(self, db: Connection) -> None:
        org = await create_org(db)
        old, new, lost = key(), key(), key()
        old_ring = Keyring([("k-old", old)])
        ids = [await _seal_row(db, org, old_ring, f"ghp_token_{n}_abcdefghijkl") for n in range(3)]
        orphan = await _seal_row(db, org, Keyring([("k-lost", lost)]), "ghp_orphan_abcdefghijkl")

        ring = parse_keys(spec(("k-new", new), ("k-old", old)))
        report = await rotate_credentials(TransactionDatabase(db), keyring=ring, batch_size=2)
        assert report.resealed >= 3
        assert str(orphan) in report.unreadable

        await db.execute("reset role")
        rows = await (
            await db.execute("select * from secrets.connection_credentials where connection_id = any(%s)", (ids,))
        ).fetchall()
        assert {r["key_id"] for r in rows} == {"k-new"}
        only_new = Keyring([("k-new", new)])
        for row in rows:
            sealed = Sealed(row["key_id"], bytes(row["nonce"]), bytes(row["ciphertext"]))
            assert b"ghp_token_" in only_new.open(sealed, org_id=org["id"], connection_id=row["connection_id"])
        [audit] = await (
            await db.execute(
                "select * from public.audit_log where org_id = %s and action = 'connection.credentials_resealed'",
                (org["id"],),
            )
        ).fetchall()
        assert audit["details"] == {"count": 3, "key_id": "k-new"}

        again = await rotate_credentials(TransactionDatabase(db), keyring=ring)
        assert again.resealed == 0

    async def test_service_helpers_seal_with_the_current_key(self, db: Connection) -> None:
        org = await create_org(db)
        credential = Credential(url="https://hooks.slack.com/services/T1/B1/abcdefghijklmnopqrst")
        sealed = seal_credential(credential, org_id=org["id"], connection_id=CONNECTION)
        assert sealed.key_id == get_keyring().current_key_id
        assert open_credential(sealed, org_id=org["id"], connection_id=CONNECTION) == credential

    def test_generate_key_prints_a_usable_key(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert rotate_main(["--generate-key"]) == 0
        printed = capsys.readouterr().out.strip()
        assert len(base64.b64decode(printed, validate=True)) == KEY_BYTES
        assert parse_keys(f"k9:{printed}").current_key_id == "k9"

    def test_runs_as_a_module_in_production_shape(self, app_url: str) -> None:
        env = {**os.environ, "DATABASE_URL": app_url, "ENVIRONMENT": "test"}
        result = subprocess.run(
            [sys.executable, "-m", "shared.connections.rotate", "--dry-run"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert '"current_key_id": "k1"' in result.stdout
        assert env["CREDENTIAL_KEYS"].split(":", 1)[1] not in result.stdout + result.stderr
