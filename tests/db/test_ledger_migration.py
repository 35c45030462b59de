"""The migration that minimizes the Stripe ledger scrubs what the ledger stored before it.

A database is built up to the migration before it, given ledger rows with full payloads (a
charge's card details among them), then migrated. The rows keep their ids; the card details are
gone from the table's files on disk, not just from what a query sees.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from shared.local.database import BOOTSTRAP, LocalServer, create_database, migration_files
from tests.conftest import cluster_lock

LEDGER_MIGRATION = "20261204030100_minimize_stripe_event_ledger.sql"


def _payload(event_id: str, obj: dict[str, object]) -> str:
    return json.dumps({"id": event_id, "object": "event", "type": "x", "data": {"object": obj}})


def _table_bytes(conn: psycopg.Connection[dict[str, object]], data_dir: Path) -> bytes:
    conn.execute("checkpoint")
    row = conn.execute(
        "select pg_relation_filepath('public.stripe_events') as heap,"
        " pg_relation_filepath(reltoastrelid) as toast from pg_class where oid = 'public.stripe_events'::regclass"
    ).fetchone()
    assert row is not None
    files = [data_dir / str(row[k]) for k in ("heap", "toast") if row[k]]
    return b"".join(f.read_bytes() for f in files if f.exists())


def test_stored_payloads_are_scrubbed_and_their_ids_kept(pg_server: LocalServer) -> None:
    name = f"hh_ledger_migration_{os.getpid()}"
    create_database(pg_server, name, replace=True)
    marker = "Fp" + uuid.uuid4().hex + "Card"
    charge = {
        "id": "ch_3Scrub",
        "object": "charge",
        "customer": "cus_Scrub1",
        "billing_details": {"name": "Jane " + marker, "email": "jane@example.test"},
        "payment_method_details": {"card": {"brand": "visa", "last4": "4242", "fingerprint": marker}},
    }
    invoice = {
        "id": "in_Scrub2",
        "object": "invoice",
        "customer": {"id": "cus_Scrub2", "email": marker},
        "parent": {"subscription_details": {"subscription": "sub_Scrub2"}},
    }
    subscription = {"id": "sub_Scrub3", "object": "subscription", "customer": "cus_Scrub3", "note": marker}
    try:
        with psycopg.connect(pg_server.url(name), autocommit=True, row_factory=dict_row) as conn:
            data_dir = Path(str(conn.execute("show data_directory").fetchone()["data_directory"]))  # type: ignore[index]
            with cluster_lock():
                conn.execute(BOOTSTRAP.read_text())
            later = []
            for path in migration_files():
                if path.name < LEDGER_MIGRATION:
                    with conn.transaction():
                        conn.execute(path.read_text())
                else:
                    later.append(path)
            for event_id, obj in (("evt_1", charge), ("evt_2", invoice), ("evt_3", subscription), ("evt_4", [])):
                conn.execute(
                    "insert into public.stripe_events (id, type, payload, outcome) values (%s, 'x', %s, 'applied')",
                    (event_id, _payload(event_id, obj)),  # type: ignore[arg-type]
                )
            assert marker.encode() in _table_bytes(conn, data_dir), "the probe cannot see the stored payload"

            for path in later:
                with conn.transaction():
                    conn.execute(path.read_text())

            rows = conn.execute(
                "select id, object_type, object_id, customer_id, subscription_id, outcome"
                " from public.stripe_events order by id"
            ).fetchall()
            assert rows == [
                {
                    "id": "evt_1",
                    "object_type": "charge",
                    "object_id": "ch_3Scrub",
                    "customer_id": "cus_Scrub1",
                    "subscription_id": None,
                    "outcome": "applied",
                },
                {
                    "id": "evt_2",
                    "object_type": "invoice",
                    "object_id": "in_Scrub2",
                    "customer_id": "cus_Scrub2",
                    "subscription_id": "sub_Scrub2",
                    "outcome": "applied",
                },
                {
                    "id": "evt_3",
                    "object_type": "subscription",
                    "object_id": "sub_Scrub3",
                    "customer_id": "cus_Scrub3",
                    "subscription_id": "sub_Scrub3",
                    "outcome": "applied",
                },
                {
                    "id": "evt_4",
                    "object_type": None,
                    "object_id": None,
                    "customer_id": None,
                    "subscription_id": None,
                    "outcome": "applied",
                },
            ]
            columns = conn.execute(
                "select attname from pg_attribute where attrelid = 'public.stripe_events'::regclass"
                " and attnum > 0 and not attisdropped"
            ).fetchall()
            assert "payload" not in {c["attname"] for c in columns}
            stored = _table_bytes(conn, data_dir)
            assert marker.encode() not in stored, "the card details are still in the table's files"
            assert b"4242" not in stored
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
