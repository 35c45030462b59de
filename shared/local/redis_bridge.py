"""A local Upstash: the Upstash Redis REST protocol in front of a real ``redis-server``.

Functions speak to Redis only through ``upstash-redis`` over Upstash's REST API. Locally and in
tests this bridge answers the same HTTP requests from a real Redis, the role Upstash's
serverless-redis-http plays. It implements what the clients send and what Upstash documents
(https://upstash.com/docs/redis/features/restapi):

* ``POST /`` with one command as a JSON array, e.g. ``["SET", "k", "v", "EX", 100]``;
* ``POST /pipeline`` and ``POST /multi-exec`` with an array of such commands, answered with one
  ``{"result": ...}`` or ``{"error": ...}`` per command; a transaction Redis discards as a whole
  is a single ``{"error": ...}`` with status 400;
* path style, ``GET|POST /<command>/<arg>/...``: a POST body is the last argument, query pairs
  follow it (``POST /set/k?EX=100`` with body ``v`` is ``SET k v EX 100``);
* ``Authorization: Bearer <token>`` or ``?_token=<token>``; anything else is 401;
* results as ``{"result": ...}`` (bulk and status strings as strings, integers, arrays, ``null``);
  a failed command as ``{"error": "<Redis error line>"}`` with status 400;
* ``Upstash-Encoding: base64``: every string in a result is base64, except a top-level ``OK``;
  without it, strings are UTF-8 with invalid bytes replaced by U+FFFD, as Upstash does.

Two translations keep the clients' Lua scripts running on stock Redis. ``upstash-ratelimit``
declares ``#!lua flags=allow-key-locking``, an Upstash-only flag that stock Redis refuses, so the
bridge drops Upstash-only flags before a script reaches Redis. Dropping them changes the digest
Redis files the script under, so the bridge remembers the digest of the script the client sent
and answers ``EVALSHA``, ``SCRIPT LOAD`` and ``SCRIPT EXISTS`` in those terms; an unknown digest
is ``NOSCRIPT``, exactly as from Upstash, and clients fall back to ``EVAL``.

Connections to Redis are pooled and shared between requests (Upstash shares no connection state
between requests either), so commands that change a connection's state (``SELECT``, ``MULTI``,
``WATCH``, ``SUBSCRIBE``, ``CLIENT``, ``HELLO``...) are refused. Not implemented: the
``Upstash-Response-Format: resp2`` option, ``/monitor`` and ``/subscribe`` (server-sent events),
read-only tokens. Never imported by ``functions/``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import parse_qsl, unquote_to_bytes

import uvicorn
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import RedisError, ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

type Json = "int | str | list[Json] | dict[str, Json] | None"
type Command = list[bytes]
type Reply = object  # what redis-py's RESP2 parser returns: bytes, int, None, list, ResponseError

# Connection-state commands: on a shared pooled connection they would leak into other requests.
REFUSED_COMMANDS = frozenset(
    {
        "AUTH", "CLIENT", "DISCARD", "EXEC", "HELLO", "MONITOR", "MULTI", "PSUBSCRIBE", "PSYNC",
        "PUNSUBSCRIBE", "QUIT", "READONLY", "READWRITE", "RESET", "SELECT", "SSUBSCRIBE",
        "SUBSCRIBE", "SUNSUBSCRIBE", "SYNC", "UNSUBSCRIBE", "UNWATCH", "WATCH",
    }
)  # fmt: skip

# Script shebang flags Upstash understands and stock Redis rejects ("Unexpected flag in script shebang").
UPSTASH_ONLY_SCRIPT_FLAGS = frozenset({b"allow-key-locking"})

REDIS_CONNECT_TIMEOUT_SECONDS = 2.0
REDIS_READ_TIMEOUT_SECONDS = 10.0
_UNAUTHORIZED = "Unauthorized: missing or invalid bearer token"


class _BadRequest(Exception):
    """A request the bridge refuses before anything reaches Redis (status 400)."""


# The part of redis-py's asyncio connection and pool the bridge uses, typed (some of these methods are
# unannotated upstream). The bridge drives connections itself rather than through redis.asyncio.Redis:
# it needs raw replies, with no per-command response callbacks, and one write per pipeline.
class _Connection(Protocol):
    def pack_commands(self, commands: Sequence[Sequence[bytes]]) -> list[bytes]: ...
    async def send_packed_command(self, command: list[bytes]) -> None: ...
    async def read_response(self) -> Reply: ...
    async def disconnect(self) -> None: ...


class _Pool(Protocol):
    async def get_connection(self) -> _Connection: ...
    async def release(self, connection: _Connection) -> None: ...
    async def aclose(self) -> None: ...


class _PoolPerLoop:
    """One redis-py connection pool per event loop, created on first use on that loop."""

    def __init__(self, redis_url: str) -> None:
        self._redis_url = redis_url
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = weakref.WeakKeyDictionary()

    def get(self) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = cast(
                _Pool,
                ConnectionPool.from_url(
                    self._redis_url,
                    socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
                    socket_timeout=REDIS_READ_TIMEOUT_SECONDS,
                ),
            )
            self._pools[loop] = pool
        return pool

    async def aclose(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()


def _sha1_hex(script: bytes) -> bytes:
    return hashlib.sha1(script, usedforsecurity=False).hexdigest().encode()


def portable_script(script: bytes) -> bytes:
    """``script`` without the shebang flags only Upstash understands; unchanged if it has none."""
    if not script.startswith(b"#!"):
        return script
    first_line, newline, body = script.partition(b"\n")
    words = []
    for word in first_line.split():
        if word.startswith(b"flags="):
            flags = [flag for flag in word[len(b"flags=") :].split(b",") if flag not in UPSTASH_ONLY_SCRIPT_FLAGS]
            word = b"flags=" + b",".join(flags) if any(flags) else b""
        if word:
            words.append(word)
    return b" ".join(words) + newline + body


class _ScriptDigests:
    """Digests of scripts as clients sent them, mapped to the digests Redis knows them by."""

    def __init__(self) -> None:
        self._redis_digest: dict[bytes, bytes] = {}

    def _portable(self, script: bytes) -> bytes:
        portable = portable_script(script)
        if portable != script:
            self._redis_digest[_sha1_hex(script)] = _sha1_hex(portable)
        return portable

    def _to_redis(self, digest: bytes) -> bytes:
        return self._redis_digest.get(digest.lower(), digest)

    def translate(self, command: Command) -> tuple[Command, Callable[[Reply], Reply] | None]:
        """The command to send to Redis, and how to turn its reply back into the client's terms."""
        name = command[0].upper()
        if name in (b"EVAL", b"EVAL_RO") and len(command) > 1:
            return [command[0], self._portable(command[1]), *command[2:]], None
        if name in (b"EVALSHA", b"EVALSHA_RO") and len(command) > 1:
            return [command[0], self._to_redis(command[1]), *command[2:]], None
        if name == b"SCRIPT" and len(command) > 2:
            sub = command[1].upper()
            if sub == b"LOAD":
                client_digest = _sha1_hex(command[2])
                return (
                    [*command[:2], self._portable(command[2]), *command[3:]],
                    lambda reply: client_digest if isinstance(reply, bytes) else reply,
                )
            if sub == b"EXISTS":
                return [*command[:2], *(self._to_redis(digest) for digest in command[2:])], None
        return command, None


def _argument(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode()
    if isinstance(value, float):
        return repr(value).encode()
    raise _BadRequest("ERR command arguments must be strings or numbers")


def _checked(command: Command) -> Command:
    if not command or not command[0]:
        raise _BadRequest("ERR empty command")
    name = command[0].decode(errors="replace").upper()
    if name in REFUSED_COMMANDS:
        raise _BadRequest(f"ERR command '{name}' is not available over the REST API")
    return command


def _json_command(value: object) -> Command:
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise _BadRequest("ERR a command is a JSON array: the command name, then its arguments")
    return _checked([_argument(item) for item in value])


def _json_commands(value: object) -> list[Command]:
    if not isinstance(value, list):
        raise _BadRequest("ERR the body must be a JSON array of commands")
    return [_json_command(item) for item in value]


def _error_line(error: ResponseError) -> str:
    # redis-py strips known prefixes ("ERR", "NOSCRIPT", ...) into status_code; clients see the full line.
    message = str(error.args[0]) if error.args else ""
    return f"{error.status_code} {message}" if error.status_code else message


def _value(reply: Reply, *, encode: bool, top_level: bool = False) -> Json:
    if reply is None or (isinstance(reply, int) and not isinstance(reply, bool)):
        return reply
    if isinstance(reply, bytes | str):
        raw = reply.encode() if isinstance(reply, str) else reply
        if encode and not (top_level and raw == b"OK"):
            return base64.b64encode(raw).decode("ascii")
        return raw.decode("utf-8", errors="replace")
    if isinstance(reply, list):
        return [_value(item, encode=encode) for item in reply]
    if isinstance(reply, ResponseError):  # an error nested in a script's reply
        return _error_line(reply)
    raise TypeError(f"unexpected reply type from Redis: {type(reply).__name__}")


def _entry(reply: Reply, *, encode: bool) -> dict[str, Json]:
    if isinstance(reply, ResponseError):
        return {"error": _error_line(reply)}
    return {"result": _value(reply, encode=encode, top_level=True)}


async def _read(connection: _Connection) -> Reply:
    try:
        return await connection.read_response()
    except ResponseError as error:
        return error


class _Executor:
    def __init__(self, redis_url: str) -> None:
        self.pools = _PoolPerLoop(redis_url)
        self.scripts = _ScriptDigests()

    async def _exchange(self, wire: list[Command]) -> list[Reply]:
        """Send ``wire`` in one write on one connection and read one reply per command."""
        pool = self.pools.get()
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(connection.pack_commands(wire))
            return [await _read(connection) for _ in wire]
        except BaseException:
            # Replies may be left unread on the socket: never hand this connection to anyone else.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    def _translate(self, commands: list[Command]) -> tuple[list[Command], list[Callable[[Reply], Reply] | None]]:
        translated = [self.scripts.translate(command) for command in commands]
        return [wire for wire, _ in translated], [fix for _, fix in translated]

    async def pipeline(self, commands: list[Command]) -> list[Reply]:
        wire, fixes = self._translate(commands)
        replies = await self._exchange(wire) if wire else []
        return [fix(reply) if fix else reply for reply, fix in zip(replies, fixes, strict=True)]

    async def transaction(self, commands: list[Command]) -> list[Reply] | ResponseError:
        if not commands:
            return []
        wire, fixes = self._translate(commands)
        replies = await self._exchange([[b"MULTI"], *wire, [b"EXEC"]])
        queued, executed = replies[1:-1], replies[-1]
        if isinstance(executed, ResponseError):  # EXECABORT: report why, as Upstash does
            return next((reply for reply in queued if isinstance(reply, ResponseError)), executed)
        if not isinstance(executed, list) or len(executed) != len(commands):
            return ResponseError("EXECABORT the transaction was not executed")
        return [fix(reply) if fix else reply for reply, fix in zip(executed, fixes, strict=True)]


def _presented_token(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    return request.query_params.get("_token")


def _path_command(request: Request, body: bytes) -> Command:
    # Split the raw path so "%2F" stays inside its argument; skip the prefix the bridge is mounted at.
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    mounted_at = len([part for part in request.scope.get("root_path", "").split("/") if part])
    segments = [part for part in raw_path.split(b"?", 1)[0].split(b"/") if part][mounted_at:]
    command = [unquote_to_bytes(segment) for segment in segments]
    if body:
        command.append(body)
    for name, value in parse_qsl(request.url.query, keep_blank_values=True):
        if name != "_token":
            command.append(name.encode())
            if value:
                command.append(value.encode())
    return _checked(command)


def _error(message: str, status_code: int = 400) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def create_bridge(redis_url: str, token: str) -> Starlette:
    """The Upstash REST API for the Redis at ``redis_url``, accepting only ``token``.

    The returned ASGI app can be served on its own (see ``start_bridge``) or mounted under a
    prefix; its Redis pool is created lazily on the running loop and closed by its lifespan.
    """
    if not token:
        raise ValueError("the bridge needs a token: Upstash never answers an unauthenticated request")
    expected = token.encode()
    executor = _Executor(redis_url)

    async def handle(request: Request) -> JSONResponse:
        presented = _presented_token(request)
        if presented is None or not hmac.compare_digest(presented.encode(), expected):
            return _error(_UNAUTHORIZED, 401)
        if request.headers.get("upstash-response-format", "json").lower() != "json":
            return _error("ERR only the json response format is available locally")
        encode = request.headers.get("upstash-encoding", "").lower() == "base64"
        route = request.path_params["path"].strip("/")
        body = await request.body()
        try:
            if route in ("pipeline", "multi-exec") and request.method in ("POST", "PUT"):
                commands = _json_commands(_parse_json(body))
                if route == "pipeline":
                    replies = await executor.pipeline(commands)
                else:
                    outcome = await executor.transaction(commands)
                    if isinstance(outcome, ResponseError):
                        return _error(_error_line(outcome))
                    replies = outcome
                return JSONResponse([_entry(reply, encode=encode) for reply in replies])
            if route:
                command = _path_command(request, body)
            elif request.method in ("POST", "PUT"):
                command = _json_command(_parse_json(body))
            else:
                raise _BadRequest("ERR no command: POST a JSON array or use /<command>/<args>")
            (reply,) = await executor.pipeline([command])
        except _BadRequest as error:
            return _error(str(error))
        except RedisError as error:  # Redis unreachable or the connection broke: not the command's fault
            return _error(f"ERR the bridge could not complete the request: {type(error).__name__}", 500)
        entry = _entry(reply, encode=encode)
        return JSONResponse(entry, status_code=400 if "error" in entry else 200)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await executor.pools.aclose()

    return Starlette(
        routes=[Route("/{path:path}", handle, methods=["GET", "POST", "PUT"])],
        lifespan=lifespan,
    )


def _parse_json(body: bytes) -> object:
    try:
        parsed: object = json.loads(body)
    except ValueError:
        raise _BadRequest("ERR the request body is not valid JSON") from None
    return parsed


@dataclass(frozen=True)
class RunningBridge:
    """A bridge served by uvicorn on a background thread; ``url`` is its UPSTASH_REDIS_REST_URL."""

    url: str
    token: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_seconds: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_seconds)


def start_bridge(
    redis_url: str,
    token: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout_seconds: float = 10.0,
) -> RunningBridge:
    """Serve ``create_bridge(redis_url, token)`` on ``host:port`` (0: any free port) until ``stop()``."""
    app = create_bridge(redis_url, token)
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without
    # it every response waits out the peer's delayed ACK (about 40 ms on loopback).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    bound_host, bound_port = listener.getsockname()[:2]
    config = uvicorn.Config(app, lifespan="on", ws="none", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="redis-bridge", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(startup_timeout_seconds)
            listener.close()
            raise RuntimeError(f"the Redis REST bridge did not start on {bound_host}:{bound_port}")
        time.sleep(0.01)
    authority = f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
    return RunningBridge(url=f"http://{authority}", token=token, server=server, thread=thread)
