"""The app factory every function uses: problems, request ids, body limits, the log line."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import APIRouter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from shared.cards import contains_pan
from shared.egress import check_url
from shared.errors import Conflict, RateLimited
from shared.web.app import create_app
from shared.web.headers import add_answer_headers
from shared.widget import cors
from tests.card_data import pans
from tests.conftest import without_generated_ids

router = APIRouter()
SECRET_IN_ERROR = "hh_wk_" + "f" * 48


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=10)


@router.post("/t/{key}/echo")
async def echo(key: str, body: Body) -> dict[str, str]:
    return {"name": body.name}


@router.post("/t/free")
async def free(body: dict[str, str]) -> dict[str, int]:
    return {"fields": len(body)}


@router.get("/t/conflict")
async def conflict() -> None:
    raise Conflict("That name is taken.")


@router.get("/t/limited")
async def limited() -> None:
    raise RateLimited(7)


@router.get("/t/boom")
async def boom() -> None:
    raise RuntimeError("password=hunter2 select * from secrets where key = " + SECRET_IN_ERROR)  # noqa: S608


@router.get("/t/boom-after-cors")
async def boom_after_cors() -> None:
    # As the widget does: the origin is decided, then something fails that nobody expected.
    add_answer_headers(cors.decide("https://shop.example", ["https://shop.example"]).headers())
    raise KeyError("unexpected")


@pytest.fixture
async def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


class TestProblems:
    async def test_domain_error_is_a_problem_document_with_request_id(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/t/conflict")
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"].endswith("/conflict")
        assert body["detail"] == "That name is taken."
        assert body["request_id"] == response.headers["x-request-id"]

    async def test_rate_limited_carries_retry_after(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/t/limited")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"

    async def test_unexpected_error_is_opaque(self, client: httpx.AsyncClient, log_lines: list[str]) -> None:
        response = await client.get("/t/boom")
        assert response.status_code == 500
        text = response.text
        for leak in ("hunter2", "select", SECRET_IN_ERROR, "Traceback", "RuntimeError"):
            assert leak not in text, f"500 body leaks {leak!r}"
        assert all("hunter2" not in line and SECRET_IN_ERROR not in line for line in log_lines)

    async def test_validation_error_never_echoes_the_input(self, client: httpx.AsyncClient) -> None:
        sneaky = "sk_live_" + "x" * 30
        response = await client.post("/t/k/echo", json={"name": sneaky})
        assert response.status_code == 422
        assert sneaky not in response.text
        assert response.json()["errors"][0]["loc"] == ["body", "name"]

    async def test_unknown_fields_are_refused(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/t/k/echo", json={"name": "a", "admin": True})
        assert response.status_code == 422
        assert response.json()["errors"][0]["loc"] == ["body", "admin"]

    async def test_unknown_route_is_a_problem(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/nowhere")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"


class TestBodyLimit:
    async def test_declared_oversized_body_is_refused_before_reading(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/t/k/echo", content=b"x" * 70_000, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json()["type"].endswith("/payload-too-large")

    async def test_streamed_oversized_body_is_refused(self, client: httpx.AsyncClient) -> None:
        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(100):
                yield b"x" * 1024

        response = await client.post("/t/k/echo", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413


class TestLogLine:
    async def test_one_json_line_per_request_with_route_template_not_path(
        self, client: httpx.AsyncClient, log_lines: list[str]
    ) -> None:
        key = "hh_wk_" + "a" * 48
        await client.post(f"/t/{key}/echo", json={"name": "ok"}, headers={"authorization": "Bearer abc.def.ghi"})
        requests = [json.loads(line) for line in log_lines if json.loads(line)["message"] == "request"]
        assert len(requests) == 1
        line = requests[0]
        assert line["route"] == "/t/{key}/echo"
        assert line["status"] == 200
        assert line["function"] == "test-app"
        assert line["request_id"].startswith("req_")
        assert key not in log_lines[0]


@router.get("/t/egress")
async def egress() -> None:
    await check_url("http://169.254.169.254/latest/meta-data/iam/security-credentials/")


class TestEgressDenied:
    async def test_refused_url_is_a_422_naming_the_rule_not_the_address(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/t/egress")
        assert response.status_code == 422
        body = response.json()
        assert body["reason"] == "metadata"
        assert body["type"].endswith("/egress-denied/metadata")
        assert "169.254" not in response.text


app = create_app("test-app", [router])


class TestPerFunctionBodyLimit:
    async def test_a_function_can_accept_larger_bodies(self) -> None:
        roomy = create_app("roomy", [router], max_body_bytes=256 * 1024)
        transport = httpx.ASGITransport(app=roomy, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            big = await client.post("/t/k/echo", json={"name": "a" * 100_000})
            too_big = await client.post("/t/k/echo", json={"name": "a" * 300_000})
        assert big.status_code == 422, "a 100 kB body reaches validation under a 256 kB cap"
        assert too_big.status_code == 413


class TestCardData:
    CARD = "4242 4242 4242 4242"

    async def test_every_function_refuses_a_body_carrying_a_card_number(
        self, client: httpx.AsyncClient, log_lines: list[str]
    ) -> None:
        response = await client.post("/t/free", json={"note": f"my card is {self.CARD}"})
        assert response.status_code == 422
        assert response.json()["type"].endswith("/card-data-refused")
        assert "4242" not in without_generated_ids(response.text)
        assert all("4242" not in without_generated_ids(line) for line in log_lines)

    async def test_a_signed_sender_can_opt_out(self) -> None:
        signed = create_app("signed", [router], scan_for_card_data=False)
        transport = httpx.ASGITransport(app=signed, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/t/free", json={"note": self.CARD})
        assert response.status_code == 200

    async def test_an_international_phone_number_is_not_a_card(self, client: httpx.AsyncClient) -> None:
        # 4915100000004 passes the Luhn check; written as a phone number it is a visitor's lead.
        response = await client.post("/t/free", json={"phone": "+4915100000004"})
        assert response.status_code == 200
        assert not contains_pan("Call me on +4915100000004 please")
        assert contains_pan("Call me on 4915100000004 please"), "without the + it could be a card"


class TestEveryAnswerKeepsItsHeaders:
    """An unexpected exception's 500 is rendered inside the factory's middleware, not by Starlette's
    last-resort handler outside it, so it keeps the request id, no-store and the CORS headers."""

    async def test_an_unexpected_500_carries_request_id_no_store_and_the_cors_headers_it_earned(
        self, log_lines: list[str]
    ) -> None:
        widget_like = create_app("widget-like", [router], headers={"Vary": "Origin"})
        transport = httpx.ASGITransport(app=widget_like, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/t/boom-after-cors", headers={"Origin": "https://shop.example"})
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-request-id"] == response.json()["request_id"]
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["access-control-allow-origin"] == "https://shop.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        assert response.headers["vary"] == "Origin"
        assert response.json()["type"].endswith("/internal-error")
        logged = [json.loads(line) for line in log_lines]
        assert [line["error_type"] for line in logged if line["message"] == "unhandled error"] == ["KeyError"]
        assert [line["status"] for line in logged if line["message"] == "request"] == [500]

    async def test_a_function_header_is_on_every_answer(self) -> None:
        widget_like = create_app("widget-like", [router], headers={"Vary": "Origin"})
        transport = httpx.ASGITransport(app=widget_like, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answers = [
                await client.get("/t/conflict"),
                await client.get("/t/limited"),
                await client.get("/t/boom"),
                await client.get("/nowhere"),
                await client.put("/t/conflict"),
                await client.post("/t/k/echo", json={"name": "x" * 11}),
                await client.post("/t/k/echo", content=b"x" * 70_000),
                await client.post("/t/free", json={"note": "4242 4242 4242 4242"}),
            ]
        assert [a.status_code for a in answers] == [409, 429, 500, 404, 405, 422, 413, 422]
        for answer in answers:
            assert answer.headers["vary"] == "Origin", answer.status_code
            assert answer.headers["cache-control"] == "no-store", answer.status_code
            assert answer.headers["x-request-id"].startswith("req_"), answer.status_code


class TestUnreadableBodies:
    """A body the JSON parser cannot read is a 422 that says why, never a bare 400 or a 500."""

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
    async def test_invalid_utf8_in_a_json_body(self, client: httpx.AsyncClient, junk: bytes) -> None:
        response = await client.post(
            "/t/k/echo", content=b'{"name": "' + junk + b'"}', headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["type"].endswith("/validation-error")
        assert problem["errors"][0]["loc"][0] == "body"
        assert problem["detail"]

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(2_000, 9_000), st.sampled_from([("[", "]"), ('{"a":', "}")]))
    async def test_json_nested_past_the_parser(
        self, client: httpx.AsyncClient, depth: int, brackets: tuple[str, str]
    ) -> None:
        opening, closing = brackets
        content = ('{"name": ' + opening * depth + "1" + closing * depth + "}").encode()
        response = await client.post("/t/k/echo", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "nested too deeply" in response.json()["detail"]

    @pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "a\\udc00b", "\\ud83d"])
    async def test_half_a_surrogate_pair_is_refused_before_anything_stores_it(
        self, client: httpx.AsyncClient, escape: str
    ) -> None:
        content = f'{{"name": "{escape}"}}'.encode()
        response = await client.post("/t/k/echo", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "Unicode" in response.json()["detail"]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b'"' not in data and b"\\" not in data


class TestValidationNeverEchoesACardNumber:
    @settings(max_examples=50, deadline=None)
    @given(pans())
    async def test_a_card_number_as_an_unknown_field_is_not_in_loc_or_detail(self, pan: str) -> None:
        # With the guard off (as for a signed sender), the renderer alone still keeps the number out.
        unguarded = create_app("unguarded", [router], scan_for_card_data=False)
        transport = httpx.ASGITransport(app=unguarded, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/t/k/echo", json={"name": "a", pan: 1})
        assert response.status_code == 422
        assert pan not in response.text
        assert response.json()["errors"][0]["loc"] == ["body", "[card number removed]"]
