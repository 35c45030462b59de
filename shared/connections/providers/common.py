"""HTTP plumbing, the provider environment and the message every provider sends."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from shared.connections.errors import CredentialRejected, ProviderUnavailable, RequestRejected
from shared.connections.schemas import Credential, DeliveryJob, Kind, ReviewItem
from shared.egress import EgressDenied, EgressPolicy, EgressReason, Resolver, check_url, guarded_client

# The type of the clients `guarded_client()` builds; nothing here constructs one any other way.
type HttpClient = httpx.AsyncClient  # noqa: TID251

NOTION_VERSION: Final = "2022-06-28"
GITHUB_API_VERSION: Final = "2022-11-28"
USER_AGENT: Final = "HiredHands-Connections/1.0 (+https://hiredhands.dev)"

# Every connection call: https only (credentials never travel in clear), no redirects, short
# timeouts, small answers (we read a few fields at most).
DELIVERY_POLICY: Final = EgressPolicy(
    purpose="connection",
    allowed_schemes=frozenset({"https"}),
    connect_timeout=5.0,
    read_timeout=10.0,
    max_response_bytes=1024 * 1024,
)


class DestinationRefused(CredentialRejected):
    """The egress guard refused the destination (private address, bad scheme or port, ...)."""

    def __init__(self, denied: EgressDenied) -> None:
        self.reason = denied.reason
        super().__init__(denied.message)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderEnvironment:
    """Where the providers are. Production uses `PRODUCTION`; only code (tests, the benchmark) builds
    another one, to point at loopback fakes. No setting or environment variable can change it."""

    github_api: str = "https://api.github.com"
    notion_api: str = "https://api.notion.com"
    slack_hosts: frozenset[str] = frozenset({"hooks.slack.com"})
    discord_hosts: frozenset[str] = frozenset(
        {"discord.com", "discordapp.com", "canary.discord.com", "ptb.discord.com"}
    )
    https_only: bool = True
    policy: EgressPolicy = DELIVERY_POLICY
    resolver: Resolver | None = None

    def client(self) -> HttpClient:
        return guarded_client(
            policy=self.policy,
            resolver=self.resolver,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=20, max_keepalive_connections=20),
        )


PRODUCTION: Final = ProviderEnvironment()


def get_provider_environment() -> ProviderEnvironment:
    """FastAPI dependency (tests override it in code, never through configuration)."""
    return PRODUCTION


@dataclass(frozen=True, slots=True)
class Verified:
    target: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Sent:
    external_ref: str | None
    found_existing: bool = False  # an earlier attempt had already created it (idempotent retry)


@dataclass(frozen=True, slots=True)
class Message:
    label: str  # "Escalation", "Draft reply", "Lead"
    title: str
    lines: list[str] = field(default_factory=list)


KIND_LABELS: Final = {"escalation": "Escalation", "draft": "Draft reply", "lead": "Lead"}


def secret_hint(credential: Credential, kind: Kind) -> str:
    """The last four characters of the part that identifies the credential: '…a1b2'."""
    value = {"webhook": credential.secret, "github": credential.token, "notion": credential.token}.get(kind)
    value = value or credential.url or ""
    return "…" + value[-4:]


def idempotency_ref(job: DeliveryJob) -> str:
    """A short, stable reference for one delivery, shown in GitHub issue bodies and Notion titles."""
    return "HH-" + job.idempotency_key.hex[:16]


# ---------------------------------------------------------------------------------------------
# HTTP plumbing shared by every provider.
# ---------------------------------------------------------------------------------------------


async def call(client: HttpClient, method: str, url: str, *, provider: str, **kwargs: Any) -> httpx.Response:
    try:
        return await client.request(method, url, **kwargs)
    except EgressDenied as exc:
        if exc.reason == EgressReason.UNRESOLVABLE:
            raise ProviderUnavailable(f"{provider}: {exc.message}") from None
        raise DestinationRefused(exc) from None
    except httpx.TimeoutException:
        raise ProviderUnavailable(f"{provider} did not answer in time.") from None
    except httpx.HTTPError:
        # The exception text can carry the URL (a webhook's credential): never passed on.
        raise ProviderUnavailable(f"{provider} could not be reached.") from None


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, min(float(value), 3600.0)) if value else None
    except ValueError:
        return None


def json_object(response: httpx.Response, *, provider: str) -> dict[str, Any]:
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError):
        raise ProviderUnavailable(f"{provider} sent an answer that is not JSON.", status=response.status_code) from None
    if not isinstance(data, dict):
        raise ProviderUnavailable(f"{provider} sent an unexpected answer.", status=response.status_code)
    return data


def transient_failure(response: httpx.Response, provider: str) -> ProviderUnavailable | None:
    status = response.status_code
    if status in (408, 425, 429) or status >= 500:
        what = "is rate limiting us" if status == 429 else "had a temporary problem"
        return ProviderUnavailable(
            f"{provider} {what} (HTTP {status}).", status=status, retry_after=retry_after(response)
        )
    return None


def redirect_refusal(response: httpx.Response, provider: str) -> RequestRejected | None:
    if 300 <= response.status_code < 400:
        return RequestRejected(
            f"{provider} answered with a redirect (HTTP {response.status_code}); redirects are never followed, "
            "so use the final URL.",
            status=response.status_code,
        )
    return None


async def check_customer_url(
    url: str, *, env: ProviderEnvironment, hosts: frozenset[str] | None, path: re.Pattern[str] | None, what: str
) -> httpx.URL:
    """Shape rules for a URL the customer gave us, then the egress guard's save-time check."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise CredentialRejected(f"The {what} is not a valid URL.") from None
    if parsed.scheme != "https" and (env.https_only or parsed.scheme != "http"):
        raise CredentialRejected(f"The {what} must start with https://.")
    if parsed.userinfo or parsed.fragment:
        raise CredentialRejected(f"The {what} must not contain a user name, password or #fragment.")
    if hosts is not None and parsed.host not in hosts:
        raise CredentialRejected(f"The {what} must be on {', '.join(sorted(hosts))}.")
    if path is not None and (parsed.query or not path.match(parsed.path)):
        raise CredentialRejected(f"The {what} does not have the shape the provider issues; copy it again.")
    try:
        await check_url(url, policy=env.policy, resolver=env.resolver)
    except EgressDenied as exc:
        if exc.reason == EgressReason.UNRESOLVABLE:
            raise ProviderUnavailable(exc.message) from None
        raise DestinationRefused(exc) from None
    return parsed


def message_for(item: ReviewItem) -> Message:
    """The review item as short text lines; values are bounded, nested data is compact JSON."""
    lines: list[str] = []
    for key, value in list(item.payload.items())[:12]:
        if value is None or value == "" or value == [] or value == {}:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        text = " ".join(text.split())
        lines.append(f"{str(key)[:60]}: {text[:500]}")
    return Message(label=KIND_LABELS.get(item.kind, item.kind.title()), title=item.title[:300], lines=lines)
