"""Smoke test of the deployment as built: every function in ``.vercel/output``, assembled from only
what it ships, started through Vercel's own Python entry and reached through ``config.json``'s routes,
answers against the local stack.

Functions are discovered from the build output, so a new one is covered by the generic checks at
once; add its own behaviour to ``FUNCTION_CHECKS`` below (a request or two that prove it does its job).
"""

from __future__ import annotations

import json
import re
import tomllib
import uuid
from collections.abc import Callable

import httpx
import pytest

from shared.local.build_output import ROOT, BuiltFunction, built_functions, output_config
from shared.local.cli import DEMO_USER, DEMO_WIDGET_KEY
from shared.local.routes import rewrites
from tests.deploy.conftest import CRON_SECRET, Deployment, ServeBuilt
from tests.factories import access_token
from tests.fakes.stripe_api import event, sign, stripe_id

BUILT = [function.name for function in built_functions()]
# Functions that answer HTTP at the paths config.json routes to them, and queue subscribers.
SUBSCRIBERS = [function.name for function in built_functions() if function.config.get("experimentalTriggers")]
HTTP_FUNCTIONS = [name for name in BUILT if name not in SUBSCRIBERS]
SCANNING_FUNCTIONS = {"functions/cron_scans.py", "_py_subscribers/functions-queues-scan__steps"}
# Repository files that must never be deployed, and the dependencies only the scan worker may ship.
NOT_DEPLOYED = (
    "tests/",
    "bench/",
    "docs/",
    "scripts/",
    "supabase/",
    "shared/local/",
    ".local/",
    "node_modules/",
    ".vercel/",
)
EXTRACTION_STACK = ("_vendor/trafilatura/", "_vendor/lxml/", "_vendor/babel/", "_vendor/courlan/")
ORIGIN = "http://localhost:3000"
# The widget and the webhook start most often; they ship no extraction stack and no Supabase client.
# Unzipped megabytes, precompiled bytecode not counted: the widget's target is 60 and it ships
# cryptography (15 MB) to decrypt a customer's own model key; the webhook adds Stripe's SDK (13 MB).
LEAN_BUDGET_MB = {"functions/external/widget_chat.py": 61, "functions/webhook/stripe_webhook.py": 76}


def demo_token() -> str:
    return access_token(DEMO_USER)


def test_the_build_output_is_there(built: dict[str, BuiltFunction]) -> None:
    assert built, "the build output has no functions"
    assert {r.function for r in rewrites()} <= {
        name[len("functions/") : -len(".py")].replace("/", ".") for name in built
    }


@pytest.mark.parametrize("name", BUILT)
def test_ships_only_what_it_runs(built: dict[str, BuiltFunction], name: str) -> None:
    shipped = built[name].shipped_files()
    stray = sorted(path for path in shipped if path.startswith(NOT_DEPLOYED))
    assert not stray, f"{name} deploys repository tooling: {stray[:10]}"
    extraction = {path.split("/")[1] for path in shipped if path.startswith(EXTRACTION_STACK)}
    if name in SCANNING_FUNCTIONS:
        assert extraction, f"{name} scans pages but ships no extraction stack"
    if name in LEAN_BUDGET_MB:
        assert not extraction, f"{name} ships the page-extraction stack it never uses: {sorted(extraction)}"


@pytest.mark.parametrize("name", sorted(LEAN_BUDGET_MB))
def test_the_public_functions_stay_lean(built: dict[str, BuiltFunction], name: str) -> None:
    sizes = built[name].size_by_top_level(include_bytecode=False)
    total = sum(sizes.values()) / 1e6
    largest = ", ".join(f"{part} {size / 1e6:.1f}" for part, size in sizes.most_common(8))
    assert total <= LEAN_BUDGET_MB[name], f"{name} is {total:.1f} MB unzipped without bytecode; largest: {largest}"


@pytest.mark.parametrize("name", BUILT)
def test_ships_precompiled_bytecode_for_its_own_modules_and_its_framework(
    built: dict[str, BuiltFunction], name: str
) -> None:
    """vercel.json's build.env reached the build: nothing the function imports first is compiled at start."""
    shipped = built[name].shipped_files()
    module = built[name].module.replace(".", "/")
    tag = built[name].config["runtime"].replace("python3.", "cpython-3")
    head, _, tail = module.rpartition("/")
    for expected in (f"{head}/__pycache__/{tail}.{tag}.pyc", f"_vendor/fastapi/__pycache__/applications.{tag}.pyc"):
        assert expected in shipped, f"{name} ships no {expected}"


@pytest.mark.parametrize("name", HTTP_FUNCTIONS)
def test_starts_through_vercels_entry_and_every_rewrite_reaches_its_routes(
    built: dict[str, BuiltFunction], serve_built: ServeBuilt, deployment: Deployment, name: str
) -> None:
    served = serve_built(name)  # imports with only its bundle; raises with its output if it cannot
    assert any(m["type"] == "server-started" for m in served.messages)
    module = built[name].module
    sources = [r.source for r in rewrites() if f"functions.{r.function}" == module]
    assert sources, f"{name} has no rewrite"
    nowhere = deployment_request_direct(served.base_url, "/api/__no_such_route__")
    for source in sources:
        path = re.sub(r":\w+\*?", str(uuid.uuid4()), source)
        assert deployment.function_for(path) == name
        for method in ("GET", "POST"):
            response = deployment.request(method, path, headers={"origin": ORIGIN})
            assert response.status_code < 500 or response.status_code == 503, (source, method, response.text)
            assert response.headers.get("x-request-id"), f"{source}: not answered by the project's app"
            assert response.text != nowhere, f"{method} {source} reached {name} but none of its routes"


def deployment_request_direct(base_url: str, path: str) -> str:
    return httpx.get(base_url + path, timeout=30).text


@pytest.mark.parametrize("name", SUBSCRIBERS)
def test_each_queue_subscriber_starts_through_vercels_entry(
    built: dict[str, BuiltFunction], serve_built: ServeBuilt, name: str
) -> None:
    served = serve_built(name)  # imports with only its bundle; raises with its output if it cannot
    assert any(m["type"] == "server-started" for m in served.messages)
    declared = {
        f"functions-{s['entrypoint'].split('.', 1)[1].replace('.', '-')}": set(s["topics"])
        for s in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["vercel"]["subscribers"]
    }
    topics = {trigger["topic"] for trigger in built[name].config["experimentalTriggers"]}
    assert topics == declared[name.split("/")[1].replace("__", "_")]


# -- each function's own behaviour ----------------------------------------------------------------


def check_health(deployment: Deployment) -> None:
    live = deployment.request("GET", "/api/health")
    assert live.status_code == 200, live.text
    assert live.json() == {"status": "ok"}
    # The real database and Redis answer. A freshly started function's first connection can miss the
    # probe's short timeout on a loaded machine; a prober asks again.
    for _ in range(3):
        ready = deployment.request("GET", "/api/health/ready")
        if ready.status_code == 200:
            break
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["database"]["status"] == "ok"


def check_widget(deployment: Deployment) -> None:
    config = deployment.request("GET", f"/api/widget/{DEMO_WIDGET_KEY}/config", headers={"origin": ORIGIN})
    assert config.status_code == 200, config.text
    assert config.headers["access-control-allow-origin"] == ORIGIN
    chat = deployment.request(
        "POST",
        f"/api/widget/{DEMO_WIDGET_KEY}/chat",
        headers={"origin": ORIGIN},
        json={"message": "When are you open?"},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["reply"]
    refused = deployment.request(
        "GET", f"/api/widget/{DEMO_WIDGET_KEY}/config", headers={"origin": "https://evil.example"}
    )
    assert refused.status_code == 403, refused.text


def check_stripe_webhook(deployment: Deployment) -> None:
    body = event("invoice.created", {"id": stripe_id("in"), "object": "invoice"})
    forged = deployment.request(
        "POST", "/api/stripe/webhook", content=body, headers=sign(body, secret="whsec_not_ours_0")
    )
    assert forged.status_code == 400, forged.text
    assert forged.headers["content-type"].startswith("application/problem+json")
    signed = deployment.request("POST", "/api/stripe/webhook", content=body, headers=sign(body))
    assert signed.status_code == 200, signed.text
    assert signed.json()["outcome"] == "ignored-event-type"


def check_connections(deployment: Deployment) -> None:
    path = f"/api/connections/{uuid.uuid4()}"
    assert deployment.request("DELETE", path).status_code == 401
    # The id in the path reached the route: an unknown connection of a signed-in owner is a 404.
    missing = deployment.request("DELETE", path, headers={"authorization": f"Bearer {demo_token()}"})
    assert missing.status_code == 404, missing.text
    assert deployment.request("POST", "/api/connections", json={}).status_code == 401
    invalid = deployment.request(
        "POST", "/api/connections", json={}, headers={"authorization": f"Bearer {demo_token()}"}
    )
    assert invalid.status_code == 422, invalid.text


def check_scans(deployment: Deployment) -> None:
    path = f"/api/scans/{uuid.uuid4()}"
    assert deployment.request("GET", path).status_code == 401
    missing = deployment.request("GET", path, headers={"authorization": f"Bearer {demo_token()}"})
    assert missing.status_code == 404, missing.text


def check_billing(deployment: Deployment) -> None:
    assert deployment.request("POST", "/api/billing/checkout", json={}).status_code == 401
    card = deployment.request("POST", "/api/billing/checkout", json={"card": {"number": "4242424242424242"}})
    assert card.status_code == 422, card.text
    assert "4242424242424242" not in card.text


def check_cron(path: str) -> Callable[[Deployment], None]:
    def check(deployment: Deployment) -> None:
        assert deployment.request("GET", path).status_code == 401
        assert deployment.request("GET", path, headers={"authorization": "Bearer not-the-secret"}).status_code == 401
        run = deployment.request("GET", path, headers={"authorization": f"Bearer {CRON_SECRET}"})
        assert run.status_code == 200, run.text
        body = run.json()
        if path == "/api/cron/reconcile":  # its report, or why it skipped (no provider admin key here)
            assert "source" in body, run.text
        else:  # the workers answer with what they did, as counts
            assert body, run.text
            assert all(isinstance(count, int) for count in body.values()), run.text

    return check


FUNCTION_CHECKS: dict[str, list[Callable[[Deployment], None]]] = {
    "functions/health.py": [check_health],
    "functions/external/widget_chat.py": [check_widget],
    "functions/webhook/stripe_webhook.py": [check_stripe_webhook],
    "functions/connection_verify.py": [check_connections],
    "functions/scan.py": [check_scans],
    "functions/billing.py": [check_billing],
}


@pytest.mark.parametrize("name", sorted(FUNCTION_CHECKS))
def test_function_behaves(deployment: Deployment, built: dict[str, BuiltFunction], name: str) -> None:
    assert name in built, f"{name} has checks but was not built"
    for check in FUNCTION_CHECKS[name]:
        check(deployment)


@pytest.mark.parametrize("cron", output_config().get("crons", []) if BUILT else [], ids=lambda c: c["path"])
def test_each_cron_runs_only_for_the_scheduler(deployment: Deployment, cron: dict[str, str]) -> None:
    check_cron(cron["path"])(deployment)


def test_function_settings_are_in_the_build_output(built: dict[str, BuiltFunction]) -> None:
    vercel = json.loads((ROOT / "vercel.json").read_text())
    for build in vercel["builds"]:
        for source, settings in build.get("config", {}).get("functions", {}).items():
            config = built[source].config
            for key, value in settings.items():
                if key != "excludeFiles":
                    assert config.get(key) == value, f"{source}: {key} is {config.get(key)} in the build output"
    assert built["functions/cron_scans.py"].config["maxDuration"] >= 60  # docs/scans.md
