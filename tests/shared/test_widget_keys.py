"""Widget keys: the hash we look up is the hash the database stores, and rotation works as the widget needs."""

from __future__ import annotations

import re

import pytest

from shared.db.session import as_user
from shared.errors import Forbidden
from shared.widget import queries
from shared.widget.keys import KEY_PREFIX, hash_key
from tests.conftest import Connection, TransactionDatabase
from tests.factories import add_member, create_agent, create_org, user_claims


async def rotate_as(db: Connection, user: dict[str, object], agent_id: object) -> str:
    async with as_user(TransactionDatabase(db), user_claims(user)) as conn:
        row = await (await conn.execute("select public.rotate_widget_key(%s) as key", (agent_id,))).fetchone()
    assert row is not None
    key: str = row["key"]
    return key


async def lookup(db: Connection, key: str) -> queries.ConfigRow | None:
    return await queries.widget_config(TransactionDatabase(db), key_hash=hash_key(key))


class TestHash:
    async def test_matches_what_the_database_stores(self, db: Connection) -> None:
        key = KEY_PREFIX + "ab" * 24
        row = await (await db.execute("select sha256(convert_to(%s, 'UTF8')) as h", (key,))).fetchone()
        assert row is not None
        assert hash_key(key) == row["h"]

    def test_any_string_hashes_so_there_is_no_early_exit(self) -> None:
        for key in ("", "x", "é" * 1000, "\udc80", KEY_PREFIX):
            assert len(hash_key(key)) == 32


class TestRotation:
    async def test_an_admin_gets_a_fresh_key_once_and_the_old_one_stops_at_once(self, db: Connection) -> None:
        org = await create_org(db)
        admin = await add_member(db, org, role="admin")
        old = KEY_PREFIX + "0" * 48
        agent = await create_agent(db, org, widget_key=old)
        assert await lookup(db, old) is not None

        new = await rotate_as(db, admin, agent["id"])

        assert re.fullmatch(r"hh_wk_[0-9a-f]{48}", new), "192 bits from the database's CSPRNG"
        assert await lookup(db, old) is None
        assert await lookup(db, new) is not None
        await db.execute("reset role")
        row = await (
            await db.execute(
                "select widget_key_hint, widget_key_rotated_at from public.agents where id = %s", (agent["id"],)
            )
        ).fetchone()
        assert row is not None
        assert row["widget_key_hint"] == new[-4:]
        assert row["widget_key_rotated_at"] is not None

    async def test_keys_do_not_repeat(self, db: Connection) -> None:
        org = await create_org(db)
        agent = await create_agent(db, org)
        keys = {await rotate_as(db, org["owner"], agent["id"]) for _ in range(20)}
        assert len(keys) == 20

    @pytest.mark.parametrize("who", ["member", "outsider"])
    async def test_members_and_outsiders_cannot_rotate(self, db: Connection, who: str) -> None:
        org = await create_org(db)
        agent = await create_agent(db, org, widget_key=KEY_PREFIX + "1" * 48)
        user = await add_member(db, org) if who == "member" else (await create_org(db))["owner"]

        with pytest.raises(Forbidden):
            await rotate_as(db, user, agent["id"])
        assert await lookup(db, KEY_PREFIX + "1" * 48) is not None

    async def test_a_disabled_widget_is_not_found_by_its_key(self, db: Connection) -> None:
        org = await create_org(db)
        await create_agent(db, org, widget_key=KEY_PREFIX + "2" * 48, widget_enabled=False)
        assert await lookup(db, KEY_PREFIX + "2" * 48) is None
