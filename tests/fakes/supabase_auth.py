"""A loopback Supabase Auth (GoTrue) server: the admin endpoints the invitations use.

Speaks the documented API, as the ``supabase`` package calls it: ``POST /auth/v1/invite``
(``{"email", "data"}``, ``?redirect_to=``), ``GET /auth/v1/admin/users/{id}`` and
``GET /auth/v1/admin/users?page=&per_page=``. Admin calls need the service-role key as both
``apikey`` and ``Authorization: Bearer``; anything else is refused as GoTrue refuses it (401
``no_authorization``, 403 ``not_admin``). A request that names API version 2024-01-01 gets errors
in that version's envelope (``{"code": "<error code>", "message": …}``). Every request is recorded.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

SERVICE_ROLE_KEY = "sb_secret_fake_service_role_0123456789abcdefghijklmnop"
ANON_KEY = "sb_publishable_fake_anon_0123456789abcdefghij"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAuth:
    url: str
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # by email
    requests: list[Recorded] = field(default_factory=list)
    fail_with: tuple[int, str] | None = None  # (status, error code) for every call

    def add_user(self, email: str, *, confirmed: bool = True, user_id: uuid.UUID | None = None) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        user = _user(email, user_id or uuid.uuid4(), now, {})
        if confirmed:
            user["email_confirmed_at"] = user["confirmed_at"] = now
        self.users[email] = user
        return user

    def reset(self) -> None:
        self.users.clear()
        self.requests.clear()
        self.fail_with = None


def _user(email: str, user_id: uuid.UUID, now: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "aud": "authenticated",
        "role": "authenticated",
        "email": email,
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": data,
        "identities": [],
        "created_at": now,
        "updated_at": now,
        "is_anonymous": False,
    }


def _handler(state: FakeAuth) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("x-supabase-api-version", "2024-01-01")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str) -> None:
            if self.headers.get("x-supabase-api-version") == "2024-01-01":
                self._answer(status, {"code": code, "message": message})
            else:
                self._answer(status, {"code": status, "error_code": code, "msg": message})

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            state.requests.append(
                Recorded(
                    method, parts.path, parse_qs(parts.query), {k.lower(): v for k, v in self.headers.items()}, body
                )
            )
            if self.headers.get("apikey") is None:
                return self._error(401, "no_authorization", "No API key found in request")
            if self.headers.get("authorization") != f"Bearer {SERVICE_ROLE_KEY}":
                return self._error(403, "not_admin", "User not allowed")
            if state.fail_with:
                status, code = state.fail_with
                return self._error(status, code, "failure requested by the test")
            if method == "POST" and parts.path == "/auth/v1/invite":
                email = str((body or {}).get("email", "")).lower()
                existing = state.users.get(email)
                if existing and existing.get("email_confirmed_at"):
                    return self._error(
                        422, "email_exists", f"A user with this email address ({email}) has already been registered"
                    )
                now = datetime.now(UTC).isoformat()
                user = existing or _user(email, uuid.uuid4(), now, (body or {}).get("data") or {})
                user["invited_at"] = user["confirmation_sent_at"] = now
                state.users[email] = user
                return self._answer(200, user)
            if method == "GET" and parts.path == "/auth/v1/admin/users":
                query = parse_qs(parts.query)
                page, per_page = int(query.get("page", ["1"])[0]), int(query.get("per_page", ["50"])[0])
                users = list(state.users.values())[(page - 1) * per_page : page * per_page]
                return self._answer(200, {"users": users, "aud": "authenticated"})
            if method == "GET" and parts.path.startswith("/auth/v1/admin/users/"):
                wanted = parts.path.rsplit("/", 1)[1]
                for user in state.users.values():
                    if user["id"] == wanted:
                        return self._answer(200, user)
                return self._error(404, "user_not_found", "User not found")
            return self._error(404, "not_found", "Not found")

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@contextmanager
def running_fake_auth() -> Iterator[FakeAuth]:
    state = FakeAuth(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
