"""Factories for fresh tenants. Each call makes new rows with random ids, so tests never share data."""

from __future__ import annotations

import hashlib
import secrets
import socket
import time
import uuid
from typing import Any

import jwt
from psycopg import AsyncConnection
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from shared.settings import get_settings

Connection = AsyncConnection[DictRow]


async def _as_superuser(conn: Connection) -> None:
    # The test connection logs in as the superuser; code under test may have switched role.
    await conn.execute("reset role")


async def create_user(conn: Connection, *, email: str | None = None) -> dict[str, Any]:
    await _as_superuser(conn)
    user_id = uuid.uuid4()
    email = email or f"user-{user_id.hex[:10]}@example.test"
    await conn.execute(
        "insert into auth.users (id, aud, role, email, raw_app_meta_data, raw_user_meta_data)"
        " values (%s, 'authenticated', 'authenticated', %s, '{}', '{}')",
        (user_id, email),
    )
    return {"id": user_id, "email": email}


async def create_org(
    conn: Connection, *, owner: dict[str, Any] | None = None, name: str | None = None
) -> dict[str, Any]:
    owner = owner or await create_user(conn)
    await _as_superuser(conn)
    row = await (
        await conn.execute(
            "insert into public.organizations (name, created_by) values (%s, %s) returning *",
            (name or f"Org {secrets.token_hex(3)}", owner["id"]),
        )
    ).fetchone()
    assert row is not None
    await conn.execute(
        "insert into public.memberships (org_id, user_id, role) values (%s, %s, 'owner') on conflict do nothing",
        (row["id"], owner["id"]),
    )
    return {**row, "owner": owner}


async def add_member(conn: Connection, org: dict[str, Any], *, role: str = "member") -> dict[str, Any]:
    user = await create_user(conn)
    await _as_superuser(conn)
    await conn.execute(
        "insert into public.memberships (org_id, user_id, role) values (%s, %s, %s)", (org["id"], user["id"], role)
    )
    return user


async def create_agent(conn: Connection, org: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """An agent; with ``widget_key`` the widget is enabled and the key's hash stored."""
    await _as_superuser(conn)
    key = overrides.pop("widget_key", None)
    values: dict[str, Any] = {
        "org_id": org["id"],
        "name": f"agent-{secrets.token_hex(3)}",
        "display_name": "Helper",
        "greeting": "Hi! How can I help?",
        "system_prompt": "You are a helpful assistant for this business.",
        **overrides,
    }
    if key is not None:
        values["widget_enabled"] = overrides.get("widget_enabled", True)
        values["widget_key_hash"] = hashlib.sha256(key.encode()).digest()
        values["widget_key_hint"] = key[-4:]
    if "theme" in values:
        values["theme"] = Jsonb(values["theme"])
    columns = ", ".join(values)
    placeholders = ", ".join(f"%({c})s" for c in values)
    row = await (
        await conn.execute(f"insert into public.agents ({columns}) values ({placeholders}) returning *", values)  # noqa: S608
    ).fetchone()
    assert row is not None
    return dict(row)


def user_claims(user: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": str(user["id"]),
        "aud": "authenticated",
        "role": "authenticated",
        "email": user["email"],
        "iat": now,
        "exp": now + 3600,
        "app_metadata": {"provider": "email"},
        "user_metadata": {},
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }


def access_token(user: dict[str, Any], **overrides: Any) -> str:
    """A Supabase-shaped access token signed with the project's legacy shared secret."""
    claims = {**user_claims(user), **overrides}
    secret = get_settings().supabase_jwt_secret.get_secret_value()
    return jwt.encode(claims, secret, algorithm="HS256")


def closed_port() -> int:
    """A loopback port nothing listens on: a dependency that is down, refusing at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
