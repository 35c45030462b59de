"""Fuzzing every function through its own OpenAPI document, with real credentials for every caller.

Each function's app publishes no schema in production (``openapi_url=None``); FastAPI still builds
it, and schemathesis turns every operation into a Hypothesis strategy, in both modes: bodies,
paths, queries and headers that fit the schema, and ones that break it. Every generated request
is sent once per kind of caller the operation has:

* dashboard: no token (or the garbage bearer token schemathesis generates), and real Supabase
  access tokens of an owner, an admin and a member of the organization, and of another
  organization's owner;
* widget: an unknown key, the agent's real key (with and without its allowed origin), and the
  visitor token of a real conversation;
* cron: no secret, a wrong one, the real ``CRON_SECRET``;
* Supabase Auth's admin API (invitations) and Stripe's API at the network edge (loopback fakes);
* Stripe: unsigned, wrongly signed, and correctly signed bodies (generated events, signed with
  the endpoint's secret, so the fuzzer reaches the ledger and the re-read from the loopback Stripe).

Where a schema names an organization, agent, source, connection or scan, the strategy draws the
real one of the tenant about half the time, so generated requests reach the code behind the
tenant checks (a stateful walk without OpenAPI links: ids from the world the test set up).

Every answer must hold: no 5xx; every error an ``application/problem+json`` document with its
status; no traceback, no secret from the settings, no internal host name or path. The budget is
``FUZZ_EXAMPLES`` examples per operation, caller and mode (default 5, about a thousand requests;
derandomized, so CI sees the same requests every run; raise it locally to search further, e.g.
``FUZZ_EXAMPLES=60``).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import secrets
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from shared.billing.stripe_client import close_stripe_clients
from shared.connections.providers import get_provider_environment
from shared.egress import EgressPolicy
from shared.gateway.keys import ModelKeyEnvironment, get_model_key_environment
from shared.local.routes import function_modules
from shared.scans import ScanEnvironment, get_scan_environment
from shared.settings import get_settings
from shared.web.deps import get_request_database
from tests.conftest import REDIS_URL, Connection, TransactionDatabase
from tests.factories import access_token, add_member, create_agent, create_org
from tests.fakes.providers import Fakes, running_fakes
from tests.fakes.stripe_api import API_BASE, SECRET_KEY, WEBHOOK_SECRET, fake_stripe, sign
from tests.fakes.supabase_auth import SERVICE_ROLE_KEY, FakeAuth, running_fake_auth

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5"))
CRON_SECRET = "cron-secret-for-the-fuzzer-0123456789abcdef"
ORIGIN = "https://shop.example.com"

# Every function that answers HTTP (queue subscribers take messages, not requests: functions/queues/).
MODULES = {name: importlib.import_module(f"functions.{name}") for name in function_modules()}
FUNCTIONS: dict[str, FastAPI] = {name: module.app for name, module in MODULES.items() if hasattr(module, "app")}


@dataclass(frozen=True)
class Target:
    function: str
    method: str
    path: str
    operation: Any = field(compare=False, repr=False)

    @property
    def caller_kind(self) -> str:
        if self.path.startswith("/api/widget/"):
            return "widget"
        if self.path.startswith("/api/cron/"):
            return "cron"
        if self.path == "/api/stripe/webhook":
            return "stripe"
        if self.path.startswith("/api/health"):
            return "public"
        return "dashboard"


def _targets() -> list[Target]:
    found = []
    for name, app in FUNCTIONS.items():
        schema = schemathesis.openapi.from_dict(app.openapi())
        for result in schema.get_all_operations():
            operation = result.ok()
            found.append(Target(name, operation.method.upper(), operation.path, operation))
    return found


TARGETS = _targets()

CALLERS = {
    "dashboard": ["anonymous", "owner", "admin", "member", "outsider"],
    "widget": ["unknown-key", "key-without-origin", "key-and-origin", "visitor-token"],
    "cron": ["no-secret", "wrong-secret", "cron-secret"],
    "stripe": ["unsigned", "wrong-secret", "signed"],
    "public": ["anyone"],
}


def _modes(target: Target) -> list[GenerationMode]:
    """Schemathesis's negative data needs a body to break (it cannot make a free-form path segment
    or header invalid and still send it); paths get arbitrary text from the test itself, and the
    webhook's raw body is generated here."""
    breakable = "requestBody" in target.operation.definition.raw or target.caller_kind == "stripe"
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if breakable else [GenerationMode.POSITIVE]


CASES = [
    pytest.param(target, caller, mode, id=f"{target.method} {target.path} {caller} {mode.value}")
    for target in TARGETS
    for caller in CALLERS[target.caller_kind]
    for mode in _modes(target)
]


def test_every_function_and_operation_is_fuzzed() -> None:
    """A function or route added later is fuzzed without anyone remembering to add it."""
    without_http = set(MODULES) - set(FUNCTIONS)
    assert all(name.startswith("queues.") for name in without_http), f"functions not fuzzed: {without_http}"
    routes = {(m, r.path) for app in FUNCTIONS.values() for r in app.routes for m in getattr(r, "methods", ())}
    fuzzed = {(t.method, t.path) for t in TARGETS}
    assert {r for r in routes if r[0] != "HEAD"} <= fuzzed, f"routes not fuzzed: {routes - fuzzed}"


# -- the world the requests land in ---------------------------------------------------------------


@dataclass
class World:
    org: dict[str, Any]
    users: dict[str, dict[str, Any]]
    agent: dict[str, Any]
    key: str
    ids: dict[str, list[str]]
    visitor_token: str = ""
    secrets: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def providers() -> Iterator[Fakes]:
    with running_fakes() as running:
        yield running


@pytest.fixture(scope="module")
def supabase_auth() -> Iterator[FakeAuth]:
    with running_fake_auth() as running:
        yield running


@pytest.fixture
async def environment(monkeypatch: pytest.MonkeyPatch, worker_db: str, supabase_auth: FakeAuth) -> AsyncIterator[None]:
    monkeypatch.setenv("CRON_SECRET", CRON_SECRET)
    monkeypatch.setenv("SUPABASE_URL", supabase_auth.url)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.setenv("STRIPE_SECRET_KEY", SECRET_KEY)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", WEBHOOK_SECRET)
    monkeypatch.setenv("STRIPE_API_BASE", API_BASE)
    monkeypatch.setenv("DASHBOARD_URL", "https://app.hiredhands.test")
    get_settings.cache_clear()
    with fake_stripe():
        yield
    await close_stripe_clients()
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
async def world(db: Connection, environment: None) -> World:
    org = await create_org(db)
    users = {
        "owner": org["owner"],
        "admin": await add_member(db, org, role="admin"),
        "member": await add_member(db, org, role="member"),
        "outsider": (await create_org(db))["owner"],
    }
    key = "hh_wk_" + secrets.token_hex(24)
    agent = await create_agent(db, org, widget_key=key, allowed_origins=[ORIGIN])
    source = await (
        await db.execute(
            "insert into public.knowledge_sources (org_id, agent_id, kind, url) values (%s, %s, 'website',"
            " 'https://shop.example.com/') returning id",
            (org["id"], agent["id"]),
        )
    ).fetchone()
    scan_row = await (
        await db.execute(
            "insert into public.scans (org_id, agent_id, source_id, status, start_url) values (%s, %s, %s, 'failed',"
            " 'https://shop.example.com/')"
            " returning id",
            (org["id"], agent["id"], source["id"] if source is not None else None),
        )
    ).fetchone()
    assert source is not None
    assert scan_row is not None
    ids = {
        "org_id": [str(org["id"])],
        "agent_id": [str(agent["id"])],
        "source_id": [str(source["id"])],
        "scan_id": [str(scan_row["id"])],
        "connection_id": [],  # created through the API once the clients exist
    }
    return World(org, users, agent, key, ids)  # its rate-limit counters in Redis expire with their windows


@pytest.fixture
async def clients(
    request: pytest.FixtureRequest, db: Connection, world: World, providers: Fakes
) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    target: Target = request.node.callspec.params["target"]
    opened: dict[str, httpx.AsyncClient] = {}
    for name, app in FUNCTIONS.items():
        app.dependency_overrides[get_request_database] = lambda: TransactionDatabase(db)
        app.dependency_overrides[get_provider_environment] = lambda: providers.env
        app.dependency_overrides[get_scan_environment] = lambda: ScanEnvironment(
            resolver=providers.resolver, politeness_seconds=0, concurrency=1
        )
        # A customer's model base URL resolves through the fakes' resolver: no real DNS, no internet.
        app.dependency_overrides[get_model_key_environment] = lambda: ModelKeyEnvironment(
            EgressPolicy(purpose="model-provider"), resolver=providers.resolver
        )
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        opened[name] = httpx.AsyncClient(transport=transport, base_url="http://test")
    try:
        if target.caller_kind == "widget":
            await _open_conversation(opened, world)
        if "connection" in target.path:
            await _create_connection(opened, world, providers)
        yield opened
    finally:
        for name, client in opened.items():
            await client.aclose()
            FUNCTIONS[name].dependency_overrides.clear()


async def _open_conversation(opened: dict[str, httpx.AsyncClient], world: World) -> None:
    first = await opened["external.widget_chat"].post(
        f"/api/widget/{world.key}/chat", json={"message": "Hello"}, headers={"Origin": ORIGIN}
    )
    assert first.status_code == 200, first.text
    world.visitor_token = first.json()["visitor_token"]


async def _create_connection(opened: dict[str, httpx.AsyncClient], world: World, providers: Fakes) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    created = await opened["connection_verify"].post(
        "/api/connections",
        json={
            "org_id": str(world.org["id"]),
            "kind": "webhook",
            "name": "CRM",
            "url": providers.webhook.endpoint(),
            "signing_secret": secret,
        },
        headers={"Authorization": f"Bearer {access_token(world.users['owner'])}"},
    )
    assert created.status_code == 201, created.text
    world.ids["connection_id"] = [created.json()["id"]]
    world.secrets.append(secret)


# -- what every answer must hold ------------------------------------------------------------------

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\.py\", line \d+")


def _forbidden_strings() -> list[str]:
    """Secrets from the settings and names of the machinery behind the functions."""
    configured = get_settings()
    found = [CRON_SECRET, SECRET_KEY, WEBHOOK_SECRET, SERVICE_ROLE_KEY, REDIS_URL, "postgresql://", "psycopg"]
    for name in type(configured).model_fields:
        value = getattr(configured, name)
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else None
        if text and len(text) >= 8:
            found.append(text)
    database_url = configured.database_url.get_secret_value()
    socket_dir = re.search(r"host=([^&]+)", database_url)
    if socket_dir:
        found.append(socket_dir.group(1))
    found.append(configured.upstash_redis_rest_url.removeprefix("http://").removeprefix("https://"))
    return [s for s in found if s]


def check(response: httpx.Response, forbidden: list[str], sent: str) -> None:
    body = response.text
    assert response.status_code < 500, f"{response.status_code} for {sent}: {body[:500]}"
    if response.status_code >= 400:
        assert response.headers.get("content-type", "").startswith("application/problem+json"), (
            f"{response.status_code} without a problem document for {sent}: {body[:300]}"
        )
        problem = response.json()
        assert problem.get("status") == response.status_code, body
        assert isinstance(problem.get("type"), str), body
        assert isinstance(problem.get("title"), str), body
    assert not _TRACEBACK.search(body), f"a traceback in the answer to {sent}"
    for secret in forbidden:
        assert secret not in body, f"{secret[:6]}... in the answer to {sent}"
        for value in response.headers.values():
            assert secret not in value, f"{secret[:6]}... in a header of the answer to {sent}"


# -- requests -------------------------------------------------------------------------------------


def _with_real_ids(value: Any, world: World, pick: st.DataObject) -> Any:
    """Swap generated ids for the tenant's real ones about half the time (deeper paths)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in world.ids and isinstance(v, str) and pick.draw(st.booleans(), label=f"real {k}"):
                out[k] = world.ids[k][0]
            else:
                out[k] = v
        return out
    return value


def _headers_for(caller: str, world: World, generated: dict[str, str]) -> dict[str, str]:
    headers = {k: v for k, v in generated.items() if k.lower() not in {"authorization", "stripe-signature"}}
    if caller in world.users:
        headers["Authorization"] = f"Bearer {access_token(world.users[caller])}"
    elif caller == "anonymous" and "Authorization" in generated:
        headers["Authorization"] = generated["Authorization"]  # schemathesis's own bearer value
    elif caller == "wrong-secret":
        headers["Authorization"] = "Bearer not-the-cron-secret"
    elif caller == "cron-secret":
        headers["Authorization"] = f"Bearer {CRON_SECRET}"
    elif caller == "visitor-token":
        headers["Authorization"] = f"Bearer {world.visitor_token}"
        headers["Origin"] = ORIGIN
    elif caller == "key-and-origin":
        headers["Origin"] = ORIGIN
    elif caller == "anyone" and "Authorization" in generated:
        headers["Authorization"] = generated["Authorization"]
    return headers


_EVENT_TYPES = st.sampled_from(
    [
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "checkout.session.completed",
        "charge.succeeded",
        "payment_intent.created",
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)


def _stripe_body(pick: st.DataObject, mode: GenerationMode, world: World) -> bytes:
    """A Stripe event envelope around a generated object (positive), or any bytes (negative)."""
    if mode is GenerationMode.NEGATIVE:
        raw: bytes = pick.draw(st.binary(max_size=300) | _JSON.map(lambda v: json.dumps(v).encode()))
        return raw
    obj = pick.draw(st.dictionaries(st.text(max_size=12), _JSON, max_size=6))
    obj["id"] = pick.draw(st.sampled_from(["sub_", "in_", "cs_", "ch_"])) + uuid.uuid4().hex[:14]
    if pick.draw(st.booleans()):
        obj["customer"] = "cus_" + uuid.uuid4().hex[:14]
    if pick.draw(st.booleans()):
        obj["metadata"] = {"org_id": world.ids["org_id"][0]}
        obj["client_reference_id"] = world.ids["org_id"][0]
    event = {
        "id": "evt_" + uuid.uuid4().hex,
        "object": "event",
        "type": pick.draw(_EVENT_TYPES),
        "created": pick.draw(st.integers(min_value=0, max_value=2**33)),
        "data": {"object": obj},
    }
    return json.dumps(event).encode()


@pytest.mark.parametrize(("target", "caller", "mode"), CASES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(pick=st.data())
async def test_no_request_breaks_a_function(
    target: Target,
    caller: str,
    mode: GenerationMode,
    world: World,
    clients: dict[str, httpx.AsyncClient],
    pick: st.DataObject,
) -> None:
    case_mode = GenerationMode.POSITIVE if target.caller_kind == "stripe" else mode
    case = pick.draw(target.operation.as_strategy(generation_mode=case_mode), label="case")
    kwargs = case.as_transport_kwargs(base_url="http://test")
    path_parameters = _with_real_ids(dict(case.path_parameters or {}), world, pick)
    if "key" in (case.path_parameters or {}) and caller != "unknown-key":
        path_parameters["key"] = world.key
    for name in path_parameters:
        if name != "key" and pick.draw(st.integers(0, 3), label=f"any text as {name}") == 0:
            path_parameters[name] = pick.draw(st.text(min_size=1, max_size=40), label=name)
    url = "http://test" + target.path.format(
        **{k: urllib.parse.quote(str(v), safe="") for k, v in path_parameters.items()}
    )
    headers = _headers_for(caller, world, {k: str(v) for k, v in (kwargs.get("headers") or {}).items()})
    headers = {k: v for k, v in headers.items() if k.lower() not in {"user-agent", "connection"}}
    content: bytes | None = None
    if target.caller_kind == "stripe":
        content = _stripe_body(pick, mode, world)
        if caller == "signed":
            content = content.decode("utf-8", "replace").encode()
            headers.update(sign(content.decode()))
        elif caller == "wrong-secret":
            headers.update(sign(content.decode("utf-8", "replace"), secret="whsec_wrong_0123456789"))
    elif "json" in kwargs:
        content = json.dumps(_with_real_ids(kwargs["json"], world, pick)).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        content = data if isinstance(data, bytes) else str(data).encode()
    try:
        response = await clients[target.function].request(
            target.method,
            url,
            params=_with_real_ids(kwargs.get("params") or {}, world, pick) or None,
            headers=headers,
            content=content,
        )
    except (httpx.InvalidURL, UnicodeEncodeError):
        return  # a request no HTTP client can send (a header with a newline, say)
    sent = f"{target.method} {url} {caller} {mode.value} body={(content or b'')[:200]!r}"
    check(response, [*_forbidden_strings(), *world.secrets], sent)
