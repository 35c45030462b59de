"""The send-time guard: an httpx client whose sockets only ever open to vetted addresses.

Layering (each layer does one thing):
- `_GuardedClient` (httpx.AsyncClient): follows redirects per the policy, turns "too many" into a denial;
- `_GuardedTransport` (httpx.AsyncBaseTransport): every request, every redirect hop included, passes
  `vet_url`; timeouts are clamped to the policy; the response is size-capped while streaming;
- `_GuardedBackend` (httpcore network backend): `connect_tcp` resolves once, vets every answer, and
  dials only a vetted IP. The URL keeps its host name, so httpcore pools connections per host name and
  TLS still verifies the certificate against that name (server_hostname = original host).

Why not rewrite the URL to the IP (Dify, safehttpx, httpx-secure): httpcore pools by origin, so two
host names on one IP would share a TLS connection and the second certificate is never checked.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Final

import httpcore
import httpx

from shared.egress.checks import Resolver, SystemResolver, vet_destination, vet_url
from shared.egress.errors import EgressDenied, EgressReason, Stage, deny
from shared.egress.policy import EgressPolicy

# Only encodings whose decoded size we can bound chunk by chunk; a server that ignores this still
# meets the decoded-size cap below.
_ACCEPT_ENCODING: Final = "gzip, deflate"

# Options that would route around the guard or split its configuration in two.
_REFUSED_KWARGS: Final = {
    "transport": "the guarded transport is the only one",
    "mounts": "the guarded transport is the only one",
    "app": "the guarded transport is the only one",
    "proxy": "a proxy would open the socket instead of the guard",
    "trust_env": "proxy and certificate environment variables are always ignored",
    "follow_redirects": "set EgressPolicy.max_redirects",
    "max_redirects": "set EgressPolicy.max_redirects",
    "timeout": "set EgressPolicy.connect_timeout / read_timeout",
    "http2": "HTTP/1.1 only",
    "cert": "client certificates are not supported",
}

# httpcore -> httpx exceptions, most specific first (httpx does the same in its default transport,
# which we replace, so callers keep catching httpx.HTTPError as usual).
_ERROR_MAP: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _map_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core_error, httpx_error in _ERROR_MAP:
            if isinstance(exc, core_error):
                raise httpx_error(str(exc), request=request) from exc
        raise


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: EgressPolicy, resolver: Resolver) -> None:
        self._policy = policy
        self._resolver = resolver
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface passes the connect timeout
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # Resolved here, once per connection, and nowhere else: what was vetted is what is dialled,
        # so a DNS answer that changes between save and send (rebinding) is judged afresh.
        addresses = await vet_destination(host, port, policy=self._policy, resolver=self._resolver, stage=Stage.CONNECT)
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        if last_error is None:  # unreachable: vet_destination never returns an empty list
            raise RuntimeError("no address to connect to")
        raise last_error

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _CappedStream(httpx.AsyncByteStream):
    """The raw body, cut off past the cap. Closing it mid-body drops the connection from the pool."""

    def __init__(
        self,
        stream: AsyncIterable[bytes],
        *,
        request: httpx.Request,
        limit: int,
        too_large: Callable[[], EgressDenied],
    ) -> None:
        self._stream = stream
        self._request = request
        self._limit = limit
        self._too_large = too_large

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        with _map_errors(self._request):
            async for chunk in self._stream:
                received += len(chunk)
                if received > self._limit:
                    raise self._too_large()
                yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class _CappedResponse(httpx.Response):
    """Counts decoded bytes as well: a 64 KiB gzip chunk can inflate a thousandfold.

    httpx's aread, aiter_text and aiter_lines all read through aiter_bytes, so this covers them.
    """

    _decoded_limit: int
    _too_large: Callable[[], EgressDenied]

    async def aiter_bytes(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in super().aiter_bytes(chunk_size):
            received += len(chunk)
            if received > self._decoded_limit:
                raise self._too_large()
            yield chunk


class _GuardedTransport(httpx.AsyncBaseTransport):
    def __init__(
        self, *, policy: EgressPolicy, resolver: Resolver, ssl_context: ssl.SSLContext, limits: httpx.Limits
    ) -> None:
        self._policy = policy
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            retries=0,
            network_backend=_GuardedBackend(policy, resolver),
        )

    def _timeouts(self, requested: dict[str, float | None]) -> dict[str, float]:
        # A per-request timeout may tighten the policy, never loosen or disable it.
        policy = self._policy
        ceilings = {
            "connect": policy.connect_timeout,
            "read": policy.read_timeout,
            "write": policy.read_timeout,
            "pool": policy.connect_timeout,
        }
        clamped: dict[str, float] = {}
        for phase, ceiling in ceilings.items():
            value = requested.get(phase)
            clamped[phase] = ceiling if value is None else min(value, ceiling)
        return clamped

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        policy = self._policy
        target = vet_url(request.url, policy=policy, stage=Stage.SEND)
        extensions = dict(request.extensions)
        # sni_hostname would verify the certificate against another name than the URL's, and httpx
        # copies extensions onto redirect hops: never honoured here.
        extensions.pop("sni_hostname", None)
        extensions["timeout"] = self._timeouts(extensions.get("timeout", {}))
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=extensions,
        )
        with _map_errors(request):
            core_response = await self._pool.handle_async_request(core_request)

        def too_large() -> EgressDenied:
            return deny(
                EgressReason.RESPONSE_TOO_LARGE,
                purpose=policy.purpose,
                stage=Stage.RESPONSE,
                host=target.host,
                port=target.port,
            )

        stream = _CappedStream(
            core_response.stream,  # type: ignore[arg-type]  # an AsyncIterable[bytes] in the async pool
            request=request,
            limit=policy.max_response_bytes,
            too_large=too_large,
        )
        declared = next((v for k, v in core_response.headers if k.lower() == b"content-length"), b"")
        if request.method != "HEAD" and declared.isdigit() and int(declared) > policy.max_response_bytes:
            await stream.aclose()
            raise too_large()
        response = _CappedResponse(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=stream,
            extensions=core_response.extensions,
        )
        response._decoded_limit = policy.max_response_bytes
        response._too_large = too_large
        return response

    async def aclose(self) -> None:
        await self._pool.aclose()


# The ban on httpx.AsyncClient (pyproject banned-api) exists so that this module is the only user.
class _GuardedClient(httpx.AsyncClient):
    def __init__(self, *, egress_policy: EgressPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._egress_policy = egress_policy

    async def send(self, *args: Any, **kwargs: Any) -> httpx.Response:
        try:
            return await super().send(*args, **kwargs)
        except httpx.TooManyRedirects as exc:
            # Raised before the hop past the limit is sent; its host is the one we refused to follow.
            raise deny(
                EgressReason.TOO_MANY_REDIRECTS,
                purpose=self._egress_policy.purpose,
                stage=Stage.REDIRECT,
                host=exc.request.url.raw_host.decode("ascii"),
            ) from exc


def guarded_client(
    *, policy: EgressPolicy | None = None, resolver: Resolver | None = None, **httpx_kwargs: Any
) -> httpx.AsyncClient:
    """The only client for customer-supplied URLs (scans, webhooks, deliveries).

    Accepts AsyncClient's request-shaping options (headers, params, cookies, auth, base_url, event_hooks,
    default_encoding), plus `verify` as an ssl.SSLContext (never False) and `limits`. Everything about
    reach, redirects and time comes from the policy. Create it lazily on the running event loop.
    """
    policy = policy or EgressPolicy()
    refused = sorted(set(httpx_kwargs) & set(_REFUSED_KWARGS))
    if refused:
        why = "; ".join(f"{name}: {_REFUSED_KWARGS[name]}" for name in refused)
        raise TypeError(f"guarded_client does not accept {', '.join(refused)} ({why})")
    verify = httpx_kwargs.pop("verify", True)
    if verify is True:
        ssl_context = httpx.create_ssl_context(verify=True, trust_env=False)
    elif isinstance(verify, ssl.SSLContext):
        ssl_context = verify
    else:
        raise TypeError("verify must be True or an ssl.SSLContext: certificates are always verified")
    limits = httpx_kwargs.pop("limits", httpx.Limits(max_connections=20, max_keepalive_connections=10))
    headers = httpx.Headers({"Accept-Encoding": _ACCEPT_ENCODING})
    headers.update(httpx.Headers(httpx_kwargs.pop("headers", None)))
    transport = _GuardedTransport(
        policy=policy, resolver=resolver or SystemResolver(), ssl_context=ssl_context, limits=limits
    )
    return _GuardedClient(
        egress_policy=policy,
        transport=transport,
        trust_env=False,
        follow_redirects=policy.max_redirects > 0,
        max_redirects=policy.max_redirects,
        timeout=httpx.Timeout(
            connect=policy.connect_timeout,
            read=policy.read_timeout,
            write=policy.read_timeout,
            pool=policy.connect_timeout,
        ),
        headers=headers,
        **httpx_kwargs,
    )
