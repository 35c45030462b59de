"""Loopback fakes of Slack, Discord, GitHub, Notion and a customer's webhook endpoint.

Real sockets on 127.0.0.1 (one threaded HTTP/1.1 server per provider), reached by the code under test
through the egress guard with an explicit exception for exactly these ``ip:port`` pairs
(`environment_for`). Each fake answers the way its provider's API documentation says it does, for
valid, revoked, wrong-scope and deleted credentials, and records every request it receives.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shared.connections.providers import ProviderEnvironment
from shared.egress import DEFAULT_PORTS, EgressPolicy

JSON = {"content-type": "application/json; charset=utf-8"}
TEXT = {"content-type": "text/html"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def answer_json(status: int, data: Any, **headers: str) -> Answer:
    return Answer(status, json.dumps(data).encode(), {**JSON, **headers})


class FakeServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 that records requests and asks `handle` for answers."""

    name = "fake"

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        # Answers to give before the normal ones (e.g. two 503s, then normal service).
        self.scripted: list[Answer] = []
        # When set, the next request matching it is recorded and handled, then the answer is held
        # until `release` is set: the client is waiting for it when the test "kills" the worker.
        self.hold_when: Callable[[Request], bool] | None = None
        self.held = threading.Event()
        self.release = threading.Event()
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                parsed = urllib.parse.urlsplit(self.path)
                request = Request(
                    method=self.command,
                    path=parsed.path,
                    query=dict(urllib.parse.parse_qsl(parsed.query)),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                with fake.lock:
                    fake.requests.append(request)
                    scripted = fake.scripted.pop(0) if fake.scripted else None
                answer = scripted or fake.handle(request)
                hold = fake.hold_when
                if hold is not None and hold(request):
                    fake.hold_when = None
                    fake.held.set()
                    fake.release.wait(timeout=30)
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"fake-{self.name}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def handle(self, request: Request) -> Answer:
        raise NotImplementedError

    def received(self, method: str | None = None, path_prefix: str = "") -> list[Request]:
        with self.lock:
            return [
                r for r in self.requests if (method is None or r.method == method) and r.path.startswith(path_prefix)
            ]

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.scripted.clear()
        self.hold_when = None
        self.held.clear()
        self.release.clear()


# ---------------------------------------------------------------------------------------------
# Slack incoming webhooks: https://hooks.slack.com/services/T.../B.../<secret>
# ---------------------------------------------------------------------------------------------


class FakeSlack(FakeServer):
    name = "slack"

    def __init__(self) -> None:
        super().__init__()
        self.hooks: dict[str, str] = {}  # path -> "active" | "revoked" | "archived"
        self.messages: list[dict[str, Any]] = []

    def reset(self) -> None:
        super().reset()
        self.messages.clear()

    def webhook(self, state: str = "active") -> str:
        secret = uuid.uuid4().hex[:24]
        path = f"/services/T0TEST{uuid.uuid4().hex[:4].upper()}/B0TEST{uuid.uuid4().hex[:4].upper()}/{secret}"
        self.hooks[path] = state
        return self.url + path

    def handle(self, request: Request) -> Answer:
        state = self.hooks.get(request.path)
        if request.method != "POST":
            return Answer(405, b"invalid_method", TEXT)
        if state is None:
            return Answer(404, b"no_service", TEXT)
        if state == "revoked":
            return Answer(403, b"invalid_token", TEXT)
        if state == "archived":
            return Answer(410, b"channel_is_archived", TEXT)
        try:
            data = request.json()
        except ValueError:
            return Answer(400, b"invalid_payload", TEXT)
        if not isinstance(data, dict) or not data.get("text"):
            return Answer(400, b"no_text", TEXT)  # what a live webhook answers an empty message
        with self.lock:
            self.messages.append(data)
        return Answer(200, b"ok", TEXT)


# ---------------------------------------------------------------------------------------------
# Discord webhooks: https://discord.com/api/webhooks/<id>/<token>
# ---------------------------------------------------------------------------------------------


class FakeDiscord(FakeServer):
    name = "discord"

    def __init__(self) -> None:
        super().__init__()
        self.hooks: dict[str, tuple[str, str]] = {}  # id -> (token, state)
        self.messages: list[dict[str, Any]] = []
        self._ids = itertools.count(1_200_000_000_000_000_000)

    def reset(self) -> None:
        super().reset()
        self.messages.clear()

    def webhook(self, state: str = "active", hook_id: str | None = None) -> str:
        hook_id = hook_id or str(next(self._ids))
        token = uuid.uuid4().hex + uuid.uuid4().hex[:20]
        self.hooks[hook_id] = (token, state)
        return f"{self.url}/api/webhooks/{hook_id}/{token}"

    def handle(self, request: Request) -> Answer:
        parts = request.path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["api", "webhooks"]:
            return answer_json(404, {"message": "404: Not Found", "code": 0})
        hook_id, token = parts[2], parts[3]
        known = self.hooks.get(hook_id)
        if known is None or known[1] == "deleted":
            return answer_json(404, {"message": "Unknown Webhook", "code": 10015})
        if known[0] != token or known[1] == "reset":
            return answer_json(401, {"message": "Invalid Webhook Token", "code": 50027})
        if request.method == "GET":
            # The real answer carries the token too: the code under test must not keep it.
            return answer_json(
                200,
                {
                    "type": 1,
                    "id": hook_id,
                    "name": "Support alerts",
                    "channel_id": "1100000000000000001",
                    "guild_id": "1000000000000000001",
                    "application_id": None,
                    "token": token,
                },
            )
        data = request.json()
        if not isinstance(data, dict) or not data.get("content"):
            return answer_json(400, {"message": "Cannot send an empty message", "code": 50006})
        message_id = str(next(self._ids))
        with self.lock:
            self.messages.append({**data, "id": message_id})
        if request.query.get("wait") == "true":
            return answer_json(200, {"id": message_id, "content": data["content"], "webhook_id": hook_id})
        return Answer(204)


# ---------------------------------------------------------------------------------------------
# GitHub REST: GET /user, GET /repos/{owner}/{repo}, GET and POST /repos/{owner}/{repo}/issues
# ---------------------------------------------------------------------------------------------


@dataclass
class GitHubToken:
    login: str
    scopes: str | None  # X-OAuth-Scopes of a classic token; None for a fine-grained token
    repos: set[str]
    can_write_issues: bool = True
    revoked: bool = False


class FakeGitHub(FakeServer):
    name = "github"

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, GitHubToken] = {}
        self.repos: dict[str, dict[str, Any]] = {}
        self.issues: dict[str, list[dict[str, Any]]] = {}

    def add_repo(self, full_name: str, *, private: bool = True, has_issues: bool = True, archived: bool = False) -> str:
        self.repos[full_name] = {
            "id": 100 + len(self.repos),
            "full_name": full_name,
            "private": private,
            "has_issues": has_issues,
            "archived": archived,
        }
        self.issues.setdefault(full_name, [])
        return full_name

    def token(self, *, repos: set[str], scopes: str | None = "repo", can_write_issues: bool = True) -> str:
        value = "ghp_" + uuid.uuid4().hex + uuid.uuid4().hex[:4]
        self.tokens[value] = GitHubToken(
            login=f"bot-{uuid.uuid4().hex[:6]}", scopes=scopes, repos=repos, can_write_issues=can_write_issues
        )
        return value

    def _auth(self, request: Request) -> GitHubToken | None:
        header = request.headers.get("authorization", "")
        token = self.tokens.get(header.removeprefix("Bearer ").strip())
        return None if token is None or token.revoked else token

    def handle(self, request: Request) -> Answer:
        if "user-agent" not in request.headers:
            return answer_json(403, {"message": "Request forbidden by administrative rules."})
        token = self._auth(request)
        if token is None:
            return answer_json(401, {"message": "Bad credentials", "status": "401"})
        scope_headers = {"x-oauth-scopes": token.scopes} if token.scopes is not None else {}
        if request.path == "/user":
            return answer_json(200, {"login": token.login, "id": 1, "type": "User"}, **scope_headers)
        parts = request.path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "repos":
            return answer_json(404, {"message": "Not Found"})
        full_name = f"{parts[1]}/{parts[2]}"
        repo = self.repos.get(full_name)
        if repo is None or full_name not in token.repos:
            return answer_json(404, {"message": "Not Found"})
        if len(parts) == 3 and request.method == "GET":
            perms = {"admin": False, "maintain": False, "push": token.can_write_issues, "triage": True, "pull": True}
            return answer_json(200, {**repo, "permissions": perms}, **scope_headers)
        if parts[3:] == ["issues"] and request.method == "GET":
            with self.lock:
                found = [
                    i
                    for i in self.issues[full_name]
                    if not request.query.get("creator") or i["user"]["login"] == request.query["creator"]
                ]
            return answer_json(200, list(reversed(found)))
        if parts[3:] == ["issues"] and request.method == "POST":
            if not repo["has_issues"]:
                return answer_json(410, {"message": "Issues are disabled for this repo"})
            if not token.can_write_issues:
                return answer_json(403, {"message": "Resource not accessible by personal access token"})
            data = request.json()
            if not data.get("title"):
                return answer_json(422, {"message": "Validation Failed"})
            with self.lock:
                number = len(self.issues[full_name]) + 1
                issue = {
                    "number": number,
                    "id": 9000 + number,
                    "title": data["title"],
                    "body": data.get("body"),
                    "html_url": f"https://github.com/{full_name}/issues/{number}",
                    "user": {"login": token.login},
                    "state": "open",
                }
                self.issues[full_name].append(issue)
            return answer_json(201, issue)
        return answer_json(404, {"message": "Not Found"})


# ---------------------------------------------------------------------------------------------
# Notion: GET /v1/users/me, GET /v1/pages/{id}, GET /v1/databases/{id}, POST /v1/pages,
# POST /v1/databases/{id}/query, GET /v1/blocks/{id}/children
# ---------------------------------------------------------------------------------------------


@dataclass
class NotionToken:
    bot_id: str
    shared: set[str]
    can_insert: bool = True
    can_read: bool = True
    revoked: bool = False


def notion_error(status: int, code: str, message: str) -> Answer:
    return answer_json(status, {"object": "error", "status": status, "code": code, "message": message})


class FakeNotion(FakeServer):
    name = "notion"

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, NotionToken] = {}
        self.databases: dict[str, str] = {}  # id -> title property name
        self.pages: set[str] = set()
        self.created: list[dict[str, Any]] = []

    def reset(self) -> None:
        super().reset()
        self.created.clear()

    def add_page(self) -> str:
        page_id = str(uuid.uuid4())
        self.pages.add(page_id)
        return page_id

    def add_database(self, title_property: str = "Task") -> str:
        database_id = str(uuid.uuid4())
        self.databases[database_id] = title_property
        return database_id

    def token(self, *, shared: set[str], can_insert: bool = True, can_read: bool = True) -> str:
        value = "ntn_" + uuid.uuid4().hex + uuid.uuid4().hex[:10]
        self.tokens[value] = NotionToken(
            bot_id=str(uuid.uuid4()), shared=shared, can_insert=can_insert, can_read=can_read
        )
        return value

    def handle(self, request: Request) -> Answer:
        if not request.headers.get("notion-version"):
            return notion_error(400, "missing_version", "Notion-Version header failed validation.")
        token = self.tokens.get(request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        if token is None or token.revoked:
            return notion_error(401, "unauthorized", "API token is invalid.")
        parts = request.path.strip("/").split("/")
        if parts == ["v1", "users", "me"]:
            return answer_json(
                200,
                {"object": "user", "id": token.bot_id, "type": "bot", "bot": {"workspace_name": "Acme workspace"}},
            )
        if len(parts) == 3 and parts[1] in ("pages", "databases") and request.method == "GET":
            object_id = parts[2]
            exists = object_id in (self.pages if parts[1] == "pages" else self.databases)
            if not exists or object_id not in token.shared:
                return notion_error(404, "object_not_found", f"Could not find {parts[1][:-1]} with ID: {object_id}.")
            if not token.can_read:
                return notion_error(403, "restricted_resource", "Insufficient permissions for this endpoint.")
            if parts[1] == "databases":
                title = self.databases[object_id]
                props = {title: {"id": "title", "type": "title", "title": {}}, "Status": {"type": "select"}}
                return answer_json(200, {"object": "database", "id": object_id, "properties": props})
            return answer_json(200, {"object": "page", "id": object_id})
        if parts == ["v1", "pages"] and request.method == "POST":
            data = request.json()
            parent = data.get("parent") or {}
            parent_id = parent.get("database_id") or parent.get("page_id")
            if parent_id not in token.shared:
                return notion_error(404, "object_not_found", "Could not find parent.")
            if not token.can_insert:
                return notion_error(403, "restricted_resource", "Insufficient permissions for this endpoint.")
            page_id = str(uuid.uuid4())
            with self.lock:
                self.created.append({"id": page_id, "parent_id": parent_id, **data})
            return answer_json(
                200, {"object": "page", "id": page_id, "url": f"https://www.notion.so/{page_id.replace('-', '')}"}
            )
        if len(parts) == 4 and parts[1] == "databases" and parts[3] == "query":
            contains = request.json()["filter"]["title"]["contains"]
            with self.lock:
                results = [
                    {"object": "page", "id": p["id"], "url": f"https://www.notion.so/{p['id'].replace('-', '')}"}
                    for p in self.created
                    if p["parent_id"] == parts[2] and contains in _title_of(p)
                ]
            return answer_json(200, {"object": "list", "results": results, "has_more": False, "next_cursor": None})
        if len(parts) == 4 and parts[1] == "blocks" and parts[3] == "children":
            with self.lock:
                results = [
                    {"object": "block", "id": p["id"], "type": "child_page", "child_page": {"title": _title_of(p)}}
                    for p in self.created
                    if p["parent_id"] == parts[2]
                ]
            return answer_json(200, {"object": "list", "results": results, "has_more": False, "next_cursor": None})
        return notion_error(400, "invalid_request_url", "Invalid request URL.")


def _title_of(page: dict[str, Any]) -> str:
    for prop in (page.get("properties") or {}).values():
        if "title" in prop:
            return "".join(t["text"]["content"] for t in prop["title"])
    return ""


# ---------------------------------------------------------------------------------------------
# A customer's webhook endpoint.
# ---------------------------------------------------------------------------------------------


class FakeWebhook(FakeServer):
    name = "webhook"

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[str, int] = {}  # path -> status to answer (default 200)

    def endpoint(self, status: int = 200, *, host: str | None = None) -> str:
        path = f"/hooks/{uuid.uuid4().hex[:12]}"
        self.statuses[path] = status
        return f"http://{host or '127.0.0.1'}:{self.port}{path}"

    def handle(self, request: Request) -> Answer:
        status = self.statuses.get(request.path, 404)
        return Answer(status, b'{"received":true}' if status < 300 else b"", JSON)


# ---------------------------------------------------------------------------------------------
# Wiring.
# ---------------------------------------------------------------------------------------------


class MappingResolver:
    """Answers host names from a dict the test changes at will (DNS that rebinds on command)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise OSError("NXDOMAIN")
        return list(self.answers[host])


@dataclass
class Fakes:
    slack: FakeSlack
    discord: FakeDiscord
    github: FakeGitHub
    notion: FakeNotion
    webhook: FakeWebhook
    resolver: MappingResolver
    env: ProviderEnvironment

    def all(self) -> list[FakeServer]:
        return [self.slack, self.discord, self.github, self.notion, self.webhook]

    def reset(self) -> None:
        for fake in self.all():
            fake.reset()


def environment_for(servers: list[FakeServer], resolver: MappingResolver) -> ProviderEnvironment:
    """Production's rules, pointed at the fakes: only their exact ip:port pairs are excepted."""
    ports = frozenset(s.port for s in servers)
    policy = EgressPolicy(
        purpose="connection",
        allowed_ports=DEFAULT_PORTS | ports,
        allow_addresses=frozenset(s.address for s in servers),
        connect_timeout=2.0,
        read_timeout=5.0,
        max_response_bytes=1024 * 1024,
    )
    by_name = {s.name: s for s in servers}
    return ProviderEnvironment(
        github_api=by_name["github"].url if "github" in by_name else "http://127.0.0.1:9",
        notion_api=by_name["notion"].url if "notion" in by_name else "http://127.0.0.1:9",
        slack_hosts=frozenset({"127.0.0.1"}),
        discord_hosts=frozenset({"127.0.0.1"}),
        https_only=False,
        policy=policy,
        resolver=resolver,
    )


@contextmanager
def running_fakes() -> Iterator[Fakes]:
    servers: list[FakeServer] = [FakeSlack(), FakeDiscord(), FakeGitHub(), FakeNotion(), FakeWebhook()]
    for server in servers:
        server.start()
    resolver = MappingResolver()
    slack, discord, github, notion, webhook = servers
    assert isinstance(slack, FakeSlack)
    assert isinstance(discord, FakeDiscord)
    assert isinstance(github, FakeGitHub)
    assert isinstance(notion, FakeNotion)
    assert isinstance(webhook, FakeWebhook)
    try:
        yield Fakes(slack, discord, github, notion, webhook, resolver, environment_for(servers, resolver))
    finally:
        for server in servers:
            server.stop()
