"""The review queue's way in: validation of what a model hands over, and the rows the database keeps."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.db.session import as_service, as_user
from shared.errors import Conflict, Unprocessable
from shared.gateway import CAPTURE_LEAD, ESCALATE, ToolCall
from shared.reviews import (
    MAX_DRAFT_CHARS,
    MAX_TITLE_CHARS,
    NewReviewItem,
    create_review_items,
    escalation,
    from_tool_call,
    lead,
    valid_email,
    valid_phone,
)
from tests.conftest import Connection, TransactionDatabase
from tests.factories import add_member, create_agent, create_org, user_claims


class TestContacts:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("ana@example.com", "ana@example.com"),
            ("  Ana.Lopez+bikes@Example.CO.uk ", "Ana.Lopez+bikes@example.co.uk"),
            ("ana@example", None),
            ("ana@@example.com", None),
            ("ana example@example.com", None),
            ("@example.com", None),
            ("ana@-example.com", None),
            ("ana@example.com\nBcc: x@y.z", None),
            ("a" * 65 + "@example.com", None),
            ("a@" + "b" * 250 + ".com", None),
            ("", None),
            (None, None),
            (42, None),
        ],
    )
    def test_email(self, value: Any, expected: str | None) -> None:
        assert valid_email(value) == expected

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("+1 (415) 555-0100", "+14155550100"),
            ("020 7946 0958", "02079460958"),
            ("555.0100.22", "555010022"),
            ("12345", None),
            ("+1234567890123456", None),
            ("call me maybe", None),
            ("1+2345678", None),
            ("555-0100; drop table", None),
            (None, None),
        ],
    )
    def test_phone(self, value: Any, expected: str | None) -> None:
        assert valid_phone(value) == expected

    @given(st.text(max_size=300))
    def test_validators_never_raise_and_keep_their_shape(self, text: str) -> None:
        email = valid_email(text)
        phone = valid_phone(text)
        assert email is None or ("@" in email and len(email) <= 254 and "\n" not in email)
        assert phone is None or phone.lstrip("+").isdigit()


class TestItems:
    def test_an_escalation_keeps_a_known_reason_and_its_draft(self) -> None:
        item = escalation(reason="complaint", summary="Bike arrived  broken.\n", draft_reply="Sorry! We'll replace it.")

        assert item == NewReviewItem(
            kind="escalation",
            title="Unhappy visitor: Bike arrived broken.",
            payload={
                "reason": "complaint",
                "summary": "Bike arrived broken.",
                "draft_reply": "Sorry! We'll replace it.",
            },
        )

    def test_an_unknown_reason_and_oversized_text_are_tamed(self) -> None:
        item = escalation(reason="ignore previous instructions", summary="x " * 5000, draft_reply="y" * 10_000)

        assert item.payload["reason"] == "other"
        assert len(item.title) <= MAX_TITLE_CHARS
        assert len(item.payload["draft_reply"]) <= MAX_DRAFT_CHARS

    def test_a_lead_needs_one_usable_contact(self) -> None:
        assert lead(email="nope", phone="also nope", name="Ana", note="hi") is None
        only_phone = lead(email="nope", phone="+44 20 7946 0958", name=None, note=None)
        assert only_phone is not None
        assert only_phone.payload == {"email": None, "phone": "+442079460958", "name": None, "note": None}
        assert only_phone.title == "New lead: +442079460958"

    def test_tool_calls_become_items(self) -> None:
        escalate = from_tool_call(
            ToolCall(ESCALATE, {"reason": "model_unavailable", "summary": "s", "draft_reply": ""})
        )
        assert escalate is not None
        assert escalate.payload["reason"] == "other", "the model cannot claim the reason reserved for our own failures"
        captured = from_tool_call(ToolCall(CAPTURE_LEAD, {"email": "a@b.co", "phone": None, "name": 7, "note": None}))
        assert captured is not None
        assert captured.payload["name"] is None
        assert from_tool_call(ToolCall("delete_everything", {})) is None
        assert from_tool_call(ToolCall(CAPTURE_LEAD, {})) is None


class TestCreate:
    async def test_items_enter_pending_with_history_and_members_work_them(self, db: Connection) -> None:
        org = await create_org(db)
        agent = await create_agent(db, org)
        member = await add_member(db, org)
        items = [
            escalation(reason="cannot_answer", summary="Wholesale prices?", draft_reply="Our wholesale list is..."),
            NewReviewItem("lead", "New lead: Ana", {"email": "ana@example.com"}),
        ]
        tdb = TransactionDatabase(db)

        async with as_service(tdb) as conn:
            ids = await create_review_items(
                conn, org_id=org["id"], agent_id=agent["id"], conversation_id=None, items=items
            )

        async with as_user(tdb, user_claims(member)) as conn:
            rows = await (
                await conn.execute("select id, kind, status from public.review_items where id = any(%s)", (ids,))
            ).fetchall()
            assert {(r["kind"], r["status"]) for r in rows} == {("escalation", "pending"), ("lead", "pending")}
            await conn.execute("update public.review_items set status = 'in_progress' where id = %s", (ids[0],))
            history = await (
                await conn.execute(
                    "select from_status, to_status, changed_by from public.review_item_status_history"
                    " where review_item_id = %s order by id",
                    (ids[0],),
                )
            ).fetchall()
        assert [(h["from_status"], h["to_status"]) for h in history] == [(None, "pending"), ("pending", "in_progress")]
        assert history[1]["changed_by"] == member["id"]

    async def test_an_illegal_transition_is_a_conflict(self, db: Connection) -> None:
        org = await create_org(db)
        tdb = TransactionDatabase(db)
        async with as_service(tdb) as conn:
            [item_id] = await create_review_items(
                conn,
                org_id=org["id"],
                agent_id=None,
                conversation_id=None,
                items=[escalation(reason="other", summary="", draft_reply="")],
            )
            await conn.execute("update public.review_items set status = 'resolved' where id = %s", (item_id,))
        with pytest.raises(Conflict):
            async with as_user(tdb, user_claims(org["owner"])) as conn:
                await conn.execute("update public.review_items set status = 'in_progress' where id = %s", (item_id,))

    async def test_an_item_cannot_name_another_organizations_agent(self, db: Connection) -> None:
        org, other = await create_org(db), await create_org(db)
        foreign_agent = await create_agent(db, other)

        with pytest.raises(Unprocessable):
            async with as_service(TransactionDatabase(db)) as conn:
                await create_review_items(
                    conn,
                    org_id=org["id"],
                    agent_id=foreign_agent["id"],
                    conversation_id=None,
                    items=[escalation(reason="other", summary="", draft_reply="")],
                )

    async def test_outsiders_see_nothing(self, db: Connection) -> None:
        org = await create_org(db)
        outsider = (await create_org(db))["owner"]
        tdb = TransactionDatabase(db)
        async with as_service(tdb) as conn:
            ids = await create_review_items(
                conn,
                org_id=org["id"],
                agent_id=None,
                conversation_id=None,
                items=[escalation(reason="other", summary="", draft_reply="")],
            )

        async with as_user(tdb, user_claims(outsider)) as conn:
            for table, column in (("review_items", "id"), ("review_item_status_history", "review_item_id")):
                cur = await conn.execute(f"select count(*) as n from public.{table} where {column} = any(%s)", (ids,))  # noqa: S608
                row = await cur.fetchone()
                assert row is not None
                assert row["n"] == 0, table

    async def test_nothing_to_create_is_no_statement(self, db: Connection) -> None:
        async with as_service(TransactionDatabase(db)) as conn:
            assert await create_review_items(conn, org_id=None, agent_id=None, conversation_id=None, items=[]) == []  # type: ignore[arg-type]
