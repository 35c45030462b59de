"""GET /api/audit-log/export and the export's integrity, from the owner's and the attacker's side.

Real database (one rolled-back transaction per test; the real pool for reads ahead on several
connections), real Redis for the export limit. The files are checked with the same verifier
customers run (``shared.audit.verify``).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg import AsyncConnection
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

from functions.audit_export import app
from shared.audit import export as export_module
from shared.audit.export import open_export, seal_line
from shared.audit.verify import main as verify_main
from shared.audit.verify import verify
from shared.db.pool import get_pool
from shared.db.session import Database, get_database
from shared.errors import Forbidden
from shared.web.deps import get_request_database
from tests.conftest import TransactionDatabase
from tests.factories import access_token, add_member, create_org, user_claims

Connection = AsyncConnection[DictRow]
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
async def client(db: Connection) -> AsyncIterator[httpx.AsyncClient]:
    app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c
    app.dependency_overrides.clear()


@pytest.fixture
async def org(db: Connection) -> dict[str, Any]:
    org = await create_org(db)
    org["admin"] = await add_member(db, org, role="admin")
    org["member"] = await add_member(db, org, role="member")
    org["other"] = await create_org(db)
    # Ten rows an hour apart, one with text that CSV and JSON must escape; and rows of another tenant.
    for i in range(10):
        await insert_row(db, org["id"], T0 + timedelta(hours=i), f"test.action_{i}", {"n": i})
    await insert_row(
        db,
        org["id"],
        T0 + timedelta(hours=3),
        "test.tricky",
        {"note": 'a "quoted", comma\nnewline'},
        target_id='name with "quotes",\nand a newline',
    )
    await insert_row(db, org["other"]["id"], T0 + timedelta(hours=2), "test.other_tenant", {"secret": "theirs"})
    return org


async def insert_row(
    db: Connection, org_id: uuid.UUID, at: datetime, action: str, details: dict[str, Any], target_id: str | None = None
) -> None:
    await db.execute("reset role")
    await db.execute(
        "insert into public.audit_log (org_id, actor, action, target_id, details, created_at)"
        " values (%s, 'test', %s, %s, %s, %s)",
        (org_id, action, target_id, Jsonb(details), at),
    )


async def rendered_lines(db: Connection, fmt: str, org_id: uuid.UUID, start: datetime, end: datetime) -> list[bytes]:
    """Each row's line rendered on its own, one query row per line, in (created_at, id) order."""
    line = export_module._NDJSON_LINE if fmt == "ndjson" else export_module._CSV_LINE
    await db.execute("reset role")
    await db.execute("set timezone = 'UTC'")
    cursor = await db.execute(
        f"select convert_to({line}, 'UTF8') as line from public.audit_log as a"  # noqa: S608 (constants)
        " where a.org_id = %s and a.created_at >= %s and a.created_at < %s order by a.created_at, a.id",
        (org_id, start, end),
    )
    return [row["line"] for row in await cursor.fetchall()]


def expected_file(fmt: str, content: bytes, lines: list[bytes], *, page_rows: int) -> bytes:
    """The export as the format documents it: header, pages of lines, a checkpoint after each full page, trailer."""
    head = b"".join(content.splitlines(keepends=True)[: 1 if fmt == "ndjson" else 2])
    out = [head]
    hasher = hashlib.sha256(head)
    for first in range(0, len(lines) + 1, page_rows):
        page = b"".join(line + b"\n" for line in lines[first : first + page_rows])
        hasher.update(page)
        out.append(page)
        if first + page_rows <= len(lines):  # a full page: a checkpoint follows
            seal = seal_line(fmt, "checkpoint", rows=min(first + page_rows, len(lines)), sha256=hasher.hexdigest())  # type: ignore[arg-type]
            hasher.update(seal)
            out.append(seal)
    out.append(seal_line(fmt, "trailer", rows=len(lines), sha256=hasher.hexdigest()))  # type: ignore[arg-type]
    return b"".join(out)


def _auth(user: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token(user)}"}


def _params(org: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"org_id": str(org["id"]), "from": T0.isoformat(), "to": (T0 + timedelta(hours=6)).isoformat(), **extra}


async def audit_rows(db: Connection, org_id: uuid.UUID, action: str) -> list[dict[str, Any]]:
    await db.execute("reset role")
    cursor = await db.execute("select * from public.audit_log where org_id = %s and action = %s", (org_id, action))
    return [dict(r) for r in await cursor.fetchall()]


class TestExport:
    async def test_admin_exports_ndjson_of_the_range_in_order_and_it_verifies(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any]
    ) -> None:
        response = await client.get("/api/audit-log/export", params=_params(org), headers=_auth(org["admin"]))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/x-ndjson"
        assert "attachment" in response.headers["content-disposition"]
        lines = [json.loads(line) for line in response.content.splitlines()]
        assert lines[0]["record"] == "header"
        assert lines[0]["org_id"] == str(org["id"])
        events = [line for line in lines if line["record"] == "event"]
        actions = [e["action"] for e in events]
        assert actions == [f"test.action_{i}" for i in range(4)] + ["test.tricky"] + ["test.action_4", "test.action_5"]
        assert "test.other_tenant" not in response.text, "another tenant's row was exported"
        assert events[4]["details"] == {"note": 'a "quoted", comma\nnewline'}
        trailer = lines[-1]
        assert trailer["record"] == "trailer"
        assert trailer["rows"] == 7
        result = verify(io.BytesIO(response.content))
        assert result.ok, result.message
        # The export is itself audited: started before the first byte, completed with the same hash.
        export_id = response.headers["x-export-id"]
        [started] = await audit_rows(db, org["id"], "audit_log.export_started")
        [done] = await audit_rows(db, org["id"], "audit_log.exported")
        assert started["target_id"] == done["target_id"] == export_id
        assert done["actor_user_id"] == org["admin"]["id"]
        assert done["details"]["sha256"] == trailer["sha256"] == result.sha256
        assert done["details"]["rows"] == 7

    async def test_csv_is_rfc4180_and_verifies(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        response = await client.get(
            "/api/audit-log/export", params=_params(org, format="csv"), headers=_auth(org["owner"])
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/csv")
        text = response.content.decode()
        records = list(csv.DictReader(line for line in io.StringIO(text, newline="") if not line.startswith("#")))
        assert [r["action"] for r in records][:5] == [*(f"test.action_{i}" for i in range(4)), "test.tricky"]
        tricky = records[4]
        assert tricky["target_id"] == 'name with "quotes",\nand a newline'
        assert json.loads(tricky["details"]) == {"note": 'a "quoted", comma\nnewline'}
        assert tricky["actor_user_id"] == ""
        assert tricky["request_id"] == ""
        assert verify(io.BytesIO(response.content)).ok

    async def test_pages_carry_checkpoints_and_resume_after_ties_on_created_at(
        self, db: Connection, org: dict[str, Any]
    ) -> None:
        # Twenty rows with the same timestamp: the keyset must order ties by id and lose none.
        same = T0 + timedelta(days=1)
        for i in range(20):
            await insert_row(db, org["id"], same, f"test.tie_{i:02d}", {})
        export = await open_export(
            TransactionDatabase(db),
            user_claims(org["owner"]),
            org_id=org["id"],
            start=same,
            end=same + timedelta(seconds=1),
            fmt="ndjson",
            request_id=None,
            page_rows=6,
        )
        content = b"".join([chunk async for chunk in export.body])
        lines = [json.loads(line) for line in content.splitlines()]
        assert [line["action"] for line in lines if line["record"] == "event"] == [
            f"test.tie_{i:02d}" for i in range(20)
        ]
        assert [line["rows"] for line in lines if line["record"] == "checkpoint"] == [6, 12, 18]
        assert verify(io.BytesIO(content)).ok

    @pytest.mark.parametrize("fmt", ["ndjson", "csv"])
    async def test_every_control_byte_quote_newline_and_unicode_round_trips_exactly(
        self, db: Connection, org: dict[str, Any], fmt: str
    ) -> None:
        # Every byte from 0x01 to 0x1f and 0x7f, the CSV and JSON specials, and text beyond the BMP,
        # in every text column and in details; three such rows over pages of two, so one starts a page.
        hostile = "".join(map(chr, range(1, 32))) + '\x7f"\\,;\r\n\r"" #x é 中文 🦀 \u2028\u2029\ufeff e\u0301 \u202e'
        at = T0 + timedelta(days=2)
        for i in range(3):
            await db.execute("reset role")
            await db.execute(
                "insert into public.audit_log (org_id, actor, action, target_type, target_id, details, request_id,"
                " created_at) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    org["id"],
                    hostile,
                    f"test.hostile_{i}{hostile}",
                    hostile,
                    hostile,
                    Jsonb({hostile: [hostile, i]}),
                    hostile,
                    at,
                ),
            )
        # A connection whose encoding cannot even hold these characters still gets UTF-8 pages.
        await db.execute("set client_encoding = 'LATIN1'")
        export = await open_export(
            TransactionDatabase(db),
            user_claims(org["owner"]),
            org_id=org["id"],
            start=at,
            end=at + timedelta(seconds=1),
            fmt=fmt,  # type: ignore[arg-type]
            request_id=None,
            page_rows=2,
        )
        content = b"".join([chunk async for chunk in export.body])
        result = verify(io.BytesIO(content))
        assert result.ok, result.message
        assert result.rows == 3
        # Byte for byte: each page is its rows' lines, as the line expression renders each row alone.
        lines = await rendered_lines(db, fmt, org["id"], at, at + timedelta(seconds=1))
        assert content == expected_file(fmt, content, lines, page_rows=2)
        if fmt == "ndjson":
            events = [json.loads(line) for line in content.splitlines() if line.startswith(b'{"record":"event"')]
        else:
            # Seal lines start with '#' outside any quoted field; the hostile text never puts '#' after a newline.
            body = "".join(line for line in io.StringIO(content.decode(), newline="") if not line.startswith("#"))
            events = list(csv.DictReader(io.StringIO(body, newline="")))
            for event in events:
                event["details"] = json.loads(event["details"])
        assert [e["action"] for e in events] == [f"test.hostile_{i}{hostile}" for i in range(3)]
        for i, event in enumerate(events):
            for column in ("actor", "target_type", "target_id", "request_id"):
                assert event[column] == hostile, column
            assert event["details"] == {hostile: [hostile, i]}

    async def test_a_reader_that_stops_early_leaves_an_incomplete_event_and_a_usable_connection(
        self, db: Connection, org: dict[str, Any]
    ) -> None:
        export = await open_export(
            TransactionDatabase(db),
            user_claims(org["owner"]),
            org_id=org["id"],
            start=T0,
            end=T0 + timedelta(days=1),
            fmt="ndjson",
            request_id=None,
            page_rows=3,
        )
        body = export.body
        header = await anext(body)
        first_page = await anext(body)  # the next page is being read ahead meanwhile
        assert header.startswith(b'{"record":"header"')
        assert first_page.count(b"\n") == 3
        await body.aclose()  # type: ignore[attr-defined]
        [incomplete] = await audit_rows(db, org["id"], "audit_log.export_incomplete")
        assert incomplete["details"]["rows_sent"] == 3
        assert await audit_rows(db, org["id"], "audit_log.exported") == []

    async def test_to_defaults_to_the_database_clock_now(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        params = _params(org)
        del params["to"]
        before = datetime.now(UTC)
        response = await client.get("/api/audit-log/export", params=params, headers=_auth(org["admin"]))
        assert response.status_code == 200
        header = json.loads(response.content.splitlines()[0])
        assert abs(datetime.fromisoformat(header["to"]) - before) < timedelta(minutes=1)
        events = [json.loads(line)["action"] for line in response.content.splitlines()[1:-1]]
        assert sum(action.startswith("test.") and action != "test.other_tenant" for action in events) == 11


class CountingDatabase:
    """The real pool, counting the connections the export holds at once.

    With ``hold``, each connection is kept that long after its transaction, as if the result took
    that long to arrive: the pages of a few rows are then read at once for certain.
    """

    def __init__(self, inner: Database, hold: float = 0.0) -> None:
        self.inner = inner
        self.hold = hold
        self.in_use = 0
        self.peak = 0

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        async with self.inner.connection() as conn:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
            try:
                yield conn
                await asyncio.sleep(self.hold)
            finally:
                self.in_use -= 1


class TestReadAheadOnThePool:
    """Committed rows and the real pool: pages are read ahead on their own connections."""

    @pytest.fixture
    async def committed(self, admin_url: str, committed_db: None) -> AsyncIterator[tuple[Connection, dict[str, Any]]]:
        conn = await AsyncConnection.connect(admin_url, row_factory=dict_row, autocommit=True, prepare_threshold=None)
        try:
            org = await create_org(conn)
            # 25 rows, in pairs sharing a timestamp, so pages also end between ties.
            for i in range(25):
                await insert_row(conn, org["id"], T0 + timedelta(seconds=i // 2), f"test.pool_{i:02d}", {"i": i})
            yield conn, org
        finally:
            await conn.close()

    @pytest.mark.parametrize("read_ahead", [1, 2, 3])
    async def test_pages_read_ahead_arrive_in_order_within_the_connection_bound(
        self, committed: tuple[Connection, dict[str, Any]], read_ahead: int
    ) -> None:
        conn, org = committed
        db = CountingDatabase(get_database(), hold=0.05)
        export = await open_export(
            db,
            user_claims(org["owner"]),
            org_id=org["id"],
            start=T0,
            end=T0 + timedelta(minutes=1),
            fmt="ndjson",
            request_id=None,
            page_rows=4,
            read_ahead=read_ahead,
        )
        content = b"".join([chunk async for chunk in export.body])
        lines = [json.loads(line) for line in content.splitlines()]
        events = [line["action"] for line in lines if line["record"] == "event"]
        assert events == [f"test.pool_{i:02d}" for i in range(25)]
        assert [line["rows"] for line in lines if line["record"] == "checkpoint"] == [4, 8, 12, 16, 20, 24]
        assert verify(io.BytesIO(content)).ok
        rendered = await rendered_lines(conn, "ndjson", org["id"], T0, T0 + timedelta(minutes=1))
        assert content == expected_file("ndjson", content, rendered, page_rows=4)
        assert db.peak == 1 + read_ahead, "pages read at once, as many as the bound and no more"
        assert db.in_use == 0

    @pytest.mark.parametrize("settings", [{"page_rows": 0}, {"read_ahead": 0}])
    async def test_a_page_size_or_read_ahead_below_one_is_refused(
        self, committed: tuple[Connection, dict[str, Any]], settings: dict[str, int]
    ) -> None:
        _, org = committed
        with pytest.raises(ValueError, match="at least 1"):
            await open_export(
                get_database(),
                user_claims(org["owner"]),
                org_id=org["id"],
                start=T0,
                end=T0 + timedelta(minutes=1),
                fmt="ndjson",
                request_id=None,
                **settings,
            )

    async def test_a_reader_that_stops_early_cancels_the_reads_ahead_and_every_connection_goes_back(
        self, committed: tuple[Connection, dict[str, Any]]
    ) -> None:
        conn, org = committed
        db = CountingDatabase(get_database())
        export = await open_export(
            db,
            user_claims(org["owner"]),
            org_id=org["id"],
            start=T0,
            end=T0 + timedelta(minutes=1),
            fmt="csv",
            request_id=None,
            page_rows=4,
            read_ahead=2,
        )
        body = export.body
        await anext(body)  # header
        first_page = await anext(body)
        assert first_page.count(b"\n") == 4
        await anext(body)  # its checkpoint; the next pages are being read
        await body.aclose()  # type: ignore[attr-defined]
        assert db.in_use == 0
        stats = (await get_pool()).get_stats()
        assert stats.get("pool_available", 0) == stats.get("pool_size", 0), stats
        await conn.execute("reset role")
        cursor = await conn.execute(
            "select details from public.audit_log where org_id = %s and action = 'audit_log.export_incomplete'",
            (org["id"],),
        )
        [incomplete] = await cursor.fetchall()
        assert incomplete["details"]["rows_sent"] == 4

    async def test_a_failing_page_cuts_the_file_and_every_connection_goes_back(
        self, committed: tuple[Connection, dict[str, Any]]
    ) -> None:
        conn, org = committed
        db = CountingDatabase(get_database())
        export = await open_export(
            db,
            user_claims(org["owner"]),
            org_id=org["id"],
            start=T0,
            end=T0 + timedelta(minutes=1),
            fmt="ndjson",
            request_id=None,
            page_rows=4,
            read_ahead=2,
        )
        body = export.body
        chunks = [await anext(body), await anext(body)]  # header and the first page; more are being read
        # The database refuses every later page: the dashboard role loses its read on the log.
        await conn.execute("revoke select on table public.audit_log from authenticated")
        try:
            with pytest.raises(Forbidden):
                async for chunk in body:
                    chunks.append(chunk)
        finally:
            await conn.execute("grant select on table public.audit_log to authenticated")
        content = b"".join(chunks)
        assert verify(io.BytesIO(content)).message.startswith("truncated")
        assert db.in_use == 0
        await conn.execute("reset role")
        cursor = await conn.execute(
            "select details from public.audit_log where org_id = %s and action = 'audit_log.export_incomplete'",
            (org["id"],),
        )
        [incomplete] = await cursor.fetchall()
        assert incomplete["details"]["rows_sent"] == sum(chunk.count(b'"record":"event"') for chunk in chunks)


class TestTamperEvidence:
    @pytest.fixture
    async def exported(self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any]) -> bytes:
        for i in range(30):
            await insert_row(db, org["id"], T0 + timedelta(minutes=i, seconds=1), f"test.bulk_{i}", {"i": i})
        export = await open_export(
            TransactionDatabase(db),
            user_claims(org["owner"]),
            org_id=org["id"],
            start=T0,
            end=T0 + timedelta(hours=1),
            fmt="ndjson",
            request_id=None,
            page_rows=8,
        )
        return b"".join([chunk async for chunk in export.body])

    def test_a_changed_byte_is_found_and_located(self, exported: bytes) -> None:
        lines = exported.splitlines(keepends=True)
        lines[12] = lines[12].replace(b"test.bulk", b"test.bulc")
        result = verify(io.BytesIO(b"".join(lines)))
        assert not result.ok
        assert result.message.startswith("modified"), result.message
        assert result.rows == 8, "the first page is still intact"

    def test_a_removed_row_is_found(self, exported: bytes) -> None:
        lines = exported.splitlines(keepends=True)
        del lines[3]
        assert verify(io.BytesIO(b"".join(lines))).message.startswith("modified")

    @pytest.mark.parametrize("cut", [1, 2, 20])
    def test_a_truncated_file_is_found(self, exported: bytes, cut: int) -> None:
        lines = exported.splitlines(keepends=True)
        result = verify(io.BytesIO(b"".join(lines[:-cut])))
        assert not result.ok
        assert result.message.startswith("truncated"), result.message

    def test_a_cut_line_is_found(self, exported: bytes) -> None:
        result = verify(io.BytesIO(exported[: len(exported) // 2]))
        assert not result.ok
        assert result.message.startswith("truncated")

    def test_recomputed_hashes_fail_against_the_audit_log_hash(self, exported: bytes, tmp_path: Any) -> None:
        original = verify(io.BytesIO(exported))
        assert original.ok
        # A forger edits a row and recomputes every checkpoint and the trailer.
        forged = _reseal(exported.replace(b'"i": 3}', b'"i": 4}'))
        assert verify(io.BytesIO(forged)).ok, "self-consistent on its own"
        path = tmp_path / "export.ndjson"
        path.write_bytes(forged)
        assert verify_main([str(path), "--expect-sha256", str(original.sha256)]) == 1
        path.write_bytes(exported)
        assert verify_main([str(path), "--expect-sha256", str(original.sha256)]) == 0

    def test_data_after_the_trailer_is_found(self, exported: bytes) -> None:
        assert not verify(io.BytesIO(exported + b'{"record":"event"}\n')).ok


def _reseal(content: bytes) -> bytes:
    import hashlib

    out = hashlib.sha256()
    result = []
    rows = 0
    for line in content.splitlines(keepends=True):
        value = json.loads(line)
        if value["record"] in ("checkpoint", "trailer"):
            line = (
                json.dumps(
                    {"record": value["record"], "rows": rows, "sha256": out.hexdigest()}, separators=(",", ":")
                ).encode()
                + b"\n"
            )
        elif value["record"] == "event":
            rows += 1
        out.update(line)
        result.append(line)
    return b"".join(result)


class TestAttackers:
    async def test_a_member_is_refused_and_nothing_is_recorded(
        self, client: httpx.AsyncClient, db: Connection, org: dict[str, Any]
    ) -> None:
        response = await client.get("/api/audit-log/export", params=_params(org), headers=_auth(org["member"]))
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert await audit_rows(db, org["id"], "audit_log.export_started") == []

    async def test_another_tenants_admin_gets_404(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        response = await client.get("/api/audit-log/export", params=_params(org), headers=_auth(org["other"]["owner"]))
        assert response.status_code == 404
        assert "test.action" not in response.text

    @pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer not-a-jwt"}])
    async def test_without_a_session_401(
        self, client: httpx.AsyncClient, org: dict[str, Any], auth: dict[str, str]
    ) -> None:
        response = await client.get("/api/audit-log/export", params=_params(org), headers=auth)
        assert response.status_code == 401

    async def test_an_anon_key_is_not_a_session(self, client: httpx.AsyncClient, org: dict[str, Any]) -> None:
        anon = access_token(org["owner"], role="anon", sub=str(org["owner"]["id"]))
        response = await client.get(
            "/api/audit-log/export", params=_params(org), headers={"Authorization": f"Bearer {anon}"}
        )
        assert response.status_code == 401

    @pytest.mark.parametrize(
        ("override", "status"),
        [
            ({"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, 422),
            ({"from": "2026-11-01T00:00:00"}, 422),
            ({"from": (datetime.now(UTC) + timedelta(days=1)).isoformat()}, 422),
            ({"format": "xlsx"}, 422),
            ({"org_id": "nope"}, 422),
            ({"extra": "1"}, 422),
        ],
    )
    async def test_bad_queries_get_a_clear_422(
        self, client: httpx.AsyncClient, org: dict[str, Any], override: dict[str, str], status: int
    ) -> None:
        response = await client.get(
            "/api/audit-log/export", params={**_params(org), **override}, headers=_auth(org["owner"])
        )
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
