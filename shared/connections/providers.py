"""Verify and send, per kind of connection: Slack and Discord webhooks, GitHub issues, Notion pages,
and Standard Webhooks signed POSTs to a customer's endpoint.

Every request goes through the egress guard's client (`shared.egress.guarded_client`), first-party
APIs included, with redirects never followed (a token must not follow a 3xx to another host).
Verification makes the cheapest call that proves the credential reaches the target, with no
visible side effect where the provider allows it:

- Slack incoming webhook: POST ``{}``. A live webhook refuses the empty message with 400
  ``invalid_payload`` / ``no_text`` and posts nothing; a revoked one answers 403 ``invalid_token``,
  a removed one 404 ``no_service`` (or ``no_team``, ``channel_not_found``), an archived channel 410.
- Discord webhook: GET the webhook URL (Discord's "Get Webhook with Token"), which returns its
  name and channel; 401 or 404 when it was reset or deleted.
- GitHub: ``GET /user`` (the token works) then ``GET /repos/{owner}/{repo}`` (it reaches the
  repository; issues enabled; not archived; classic tokens carry the ``repo``/``public_repo`` scope).
- Notion: ``GET /v1/users/me`` then retrieve the parent page or database (shared with the
  integration); for a database, its title property is remembered for sending.
- Custom webhook: a signed ``ping`` event, which the endpoint must answer with a 2xx.

Messages in errors are ours, built from the status and the provider's *documented* error codes;
response bodies are never echoed (a Discord webhook answer, for one, contains its token).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

import httpx

from shared.connections.errors import (
    CredentialRejected,
    ProviderFailure,
    ProviderUnavailable,
    RequestRejected,
)
from shared.connections.schemas import Credential, DeliveryJob, Kind, ReviewItem
from shared.egress import EgressDenied, EgressPolicy, EgressReason, Resolver, check_url, guarded_client

# The type of the clients `guarded_client()` builds; nothing here constructs one any other way.
HttpClient: TypeAlias = httpx.AsyncClient  # noqa: TID251

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
class _Message:
    label: str  # "Escalation", "Draft reply", "Lead"
    title: str
    lines: list[str] = field(default_factory=list)


_KIND_LABELS: Final = {"escalation": "Escalation", "draft": "Draft reply", "lead": "Lead"}


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


async def _call(client: HttpClient, method: str, url: str, *, provider: str, **kwargs: Any) -> httpx.Response:
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


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    try:
        return max(0.0, min(float(value), 3600.0)) if value else None
    except ValueError:
        return None


def _json_object(response: httpx.Response, *, provider: str) -> dict[str, Any]:
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError):
        raise ProviderUnavailable(f"{provider} sent an answer that is not JSON.", status=response.status_code) from None
    if not isinstance(data, dict):
        raise ProviderUnavailable(f"{provider} sent an unexpected answer.", status=response.status_code)
    return data


def _transient(response: httpx.Response, provider: str) -> ProviderUnavailable | None:
    status = response.status_code
    if status in (408, 425, 429) or status >= 500:
        what = "is rate limiting us" if status == 429 else "had a temporary problem"
        return ProviderUnavailable(
            f"{provider} {what} (HTTP {status}).", status=status, retry_after=_retry_after(response)
        )
    return None


def _redirect(response: httpx.Response, provider: str) -> RequestRejected | None:
    if 300 <= response.status_code < 400:
        return RequestRejected(
            f"{provider} answered with a redirect (HTTP {response.status_code}); redirects are never followed, "
            "so use the final URL.",
            status=response.status_code,
        )
    return None


async def _check_customer_url(
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


def _message(item: ReviewItem) -> _Message:
    """The review item as short text lines; values are bounded, nested data is compact JSON."""
    lines: list[str] = []
    for key, value in list(item.payload.items())[:12]:
        if value is None or value == "" or value == [] or value == {}:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        text = " ".join(text.split())
        lines.append(f"{str(key)[:60]}: {text[:500]}")
    return _Message(label=_KIND_LABELS.get(item.kind, item.kind.title()), title=item.title[:300], lines=lines)


# ---------------------------------------------------------------------------------------------
# Slack incoming webhooks.
# ---------------------------------------------------------------------------------------------

_SLACK_PATH: Final = re.compile(r"^/services/[A-Z0-9]{5,20}/[A-Z0-9]{5,20}/[A-Za-z0-9]{16,64}$")
# A live webhook refuses an empty message with one of these (documented and observed answers).
_SLACK_EMPTY_REFUSALS: Final = frozenset({"invalid_payload", "no_text", "missing_text_or_fallback_or_attachments"})
_SLACK_GONE: Final = {
    "invalid_token": "this webhook's token was revoked",
    "action_prohibited": "the workspace does not allow this webhook to post here",
    "no_service": "this webhook was removed or its app uninstalled",
    "no_team": "the workspace of this webhook no longer exists",
    "team_disabled": "the workspace of this webhook is disabled",
    "channel_not_found": "the webhook's channel no longer exists",
    "channel_is_archived": "the webhook's channel is archived",
}


def _slack_code(response: httpx.Response) -> str:
    text = response.text.strip()[:100]
    return text if text in _SLACK_GONE or text in _SLACK_EMPTY_REFUSALS or text == "ok" else ""


def _slack_failure(response: httpx.Response) -> ProviderFailure:
    code = _slack_code(response)
    status = response.status_code
    transient = _transient(response, "Slack")
    if transient is not None:
        return transient
    if status in (401, 403, 404, 410):
        why = _SLACK_GONE.get(code, "the webhook no longer works")
        return CredentialRejected(
            f"Slack refused the webhook (HTTP {status}{' ' + code if code else ''}): {why}.", status=status
        )
    return _redirect(response, "Slack") or RequestRejected(
        f"Slack refused the message (HTTP {status}{' ' + code if code else ''}).", status=status
    )


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn control characters: escaping them also stops <!channel>-style pings.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def _verify_slack(client: HttpClient, credential: Credential, env: ProviderEnvironment) -> Verified:
    url = await _check_customer_url(
        credential.url or "", env=env, hosts=env.slack_hosts, path=_SLACK_PATH, what="Slack webhook URL"
    )
    response = await _call(client, "POST", str(url), provider="Slack", json={})
    if response.status_code == 200 or (response.status_code == 400 and _slack_code(response) in _SLACK_EMPTY_REFUSALS):
        return Verified(target={"host": url.host})
    raise _slack_failure(response)


async def _send_slack(client: HttpClient, credential: Credential, job: DeliveryJob) -> Sent:
    message = _message(job.item)
    text = f"*{message.label}:* {_slack_escape(message.title)}"
    if message.lines:
        text += "\n" + "\n".join(_slack_escape(line) for line in message.lines)
    response = await _call(client, "POST", credential.url or "", provider="Slack", json={"text": text[:3900]})
    if response.status_code == 200:
        return Sent(external_ref=None)
    raise _slack_failure(response)


# ---------------------------------------------------------------------------------------------
# Discord webhooks.
# ---------------------------------------------------------------------------------------------

_DISCORD_PATH: Final = re.compile(r"^/api(?:/v\d{1,2})?/webhooks/(\d{5,25})/([A-Za-z0-9_-]{20,100})$")


def _discord_failure(response: httpx.Response) -> ProviderFailure:
    status = response.status_code
    if status == 429:
        retry = _retry_after(response)
        if retry is None:
            try:
                retry = float(response.json().get("retry_after"))
            except (ValueError, TypeError, AttributeError):
                retry = None
        return ProviderUnavailable("Discord is rate limiting us (HTTP 429).", status=status, retry_after=retry)
    transient = _transient(response, "Discord")
    if transient is not None:
        return transient
    if status == 401:
        return CredentialRejected(
            "Discord rejected the webhook token (HTTP 401): it was reset or deleted.", status=status
        )
    if status == 404:
        return CredentialRejected(
            "Discord does not know this webhook (HTTP 404 Unknown Webhook): it was deleted.", status=status
        )
    if status == 403:
        return CredentialRejected(
            "Discord refused the webhook (HTTP 403): it may not post to its channel.", status=status
        )
    return _redirect(response, "Discord") or RequestRejected(
        f"Discord refused the message (HTTP {status}).", status=status
    )


async def _verify_discord(client: HttpClient, credential: Credential, env: ProviderEnvironment) -> Verified:
    url = await _check_customer_url(
        credential.url or "", env=env, hosts=env.discord_hosts, path=_DISCORD_PATH, what="Discord webhook URL"
    )
    response = await _call(client, "GET", str(url), provider="Discord")
    if response.status_code != 200:
        raise _discord_failure(response)
    data = _json_object(response, provider="Discord")
    # The answer also carries the webhook's token: only these fields are kept.
    return Verified(
        target={
            "host": url.host,
            "webhook_id": str(data.get("id", ""))[:32],
            "webhook_name": str(data.get("name") or "")[:100],
            "channel_id": str(data.get("channel_id") or "")[:32],
            "guild_id": str(data.get("guild_id") or "")[:32],
        }
    )


async def _send_discord(client: HttpClient, credential: Credential, job: DeliveryJob) -> Sent:
    message = _message(job.item)
    content = f"**{message.label}:** {message.title}"
    if message.lines:
        content += "\n" + "\n".join(message.lines)
    body = {"content": content[:2000], "allowed_mentions": {"parse": []}}  # visitor text never pings anyone
    response = await _call(client, "POST", credential.url or "", provider="Discord", params={"wait": "true"}, json=body)
    if response.status_code == 200:
        return Sent(external_ref=str(_json_object(response, provider="Discord").get("id") or "") or None)
    if response.status_code == 204:
        return Sent(external_ref=None)
    raise _discord_failure(response)


# ---------------------------------------------------------------------------------------------
# GitHub issues.
# ---------------------------------------------------------------------------------------------


def _github_headers(credential: Credential) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {credential.token}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": GITHUB_API_VERSION,
    }


def _github_failure(response: httpx.Response, repository: str) -> ProviderFailure:
    status = response.status_code
    rate_limited = status in (403, 429) and (
        response.headers.get("x-ratelimit-remaining") == "0" or "retry-after" in response.headers
    )
    if rate_limited:
        return ProviderUnavailable(
            f"GitHub is rate limiting us (HTTP {status}).", status=status, retry_after=_retry_after(response)
        )
    transient = _transient(response, "GitHub")
    if transient is not None:
        return transient
    if status == 401:
        return CredentialRejected(
            "GitHub rejected the token (HTTP 401): it is invalid, expired or revoked.", status=status
        )
    if status == 403:
        return CredentialRejected(
            f"GitHub refused access to {repository} (HTTP 403): the token lacks the permission "
            "(issues: write), or an organization policy blocks it.",
            status=status,
        )
    if status == 404:
        return CredentialRejected(
            f"GitHub cannot see {repository} with this token (HTTP 404): check the name and the token's "
            "repository access.",
            status=status,
        )
    if status == 410:
        return CredentialRejected(f"Issues are disabled on {repository} (HTTP 410).", status=status)
    return _redirect(response, "GitHub") or RequestRejected(
        f"GitHub refused the request for {repository} (HTTP {status}).", status=status
    )


def _github_repo_url(env: ProviderEnvironment, repository: str, suffix: str = "") -> str:
    owner, name = repository.split("/", 1)
    return f"{env.github_api}/repos/{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(name, safe='')}{suffix}"


async def _verify_github(
    client: HttpClient, credential: Credential, target: Mapping[str, Any], env: ProviderEnvironment
) -> Verified:
    repository = str(target.get("repository", ""))
    headers = _github_headers(credential)
    me = await _call(client, "GET", f"{env.github_api}/user", provider="GitHub", headers=headers)
    if me.status_code != 200:
        raise _github_failure(me, repository)
    login = str(_json_object(me, provider="GitHub").get("login") or "")[:100]
    # Classic tokens list their scopes; fine-grained tokens send no such header (and are scoped
    # per repository instead, which the repository read below checks).
    scopes_header = me.headers.get("x-oauth-scopes")
    scopes = {s.strip() for s in scopes_header.split(",")} if scopes_header is not None else None

    repo = await _call(client, "GET", _github_repo_url(env, repository), provider="GitHub", headers=headers)
    if repo.status_code != 200:
        raise _github_failure(repo, repository)
    data = _json_object(repo, provider="GitHub")
    private = bool(data.get("private"))
    if scopes is not None and "repo" not in scopes and (private or "public_repo" not in scopes):
        needed = "repo" if private else "public_repo (or repo)"
        raise CredentialRejected(f"The token lacks the {needed} scope needed to open issues in {repository}.")
    permissions = data.get("permissions")
    if isinstance(permissions, dict) and not permissions.get("pull", True):
        raise CredentialRejected(f"The token cannot read {repository}.")
    if data.get("archived"):
        raise CredentialRejected(f"{repository} is archived: GitHub accepts no new issues there.")
    if data.get("has_issues") is False:
        raise CredentialRejected(f"Issues are disabled on {repository}.")
    return Verified(
        target={
            "repository": str(data.get("full_name") or repository)[:140],
            "repository_id": data.get("id"),
            "private": private,
            "account": login,
        }
    )


def _marker(job: DeliveryJob) -> str:
    return f"<!-- hiredhands-delivery:{job.idempotency_key} -->"


async def _find_github_issue(
    client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment
) -> str | None:
    """After an attempt that may have reached GitHub: the issue it created, found by its marker."""
    repository = str(job.target.get("repository", ""))
    params = {
        "state": "all",
        "sort": "created",
        "direction": "desc",
        "per_page": "100",
        "since": job.created_at.isoformat(),
    }
    if job.target.get("account"):
        params["creator"] = str(job.target["account"])
    response = await _call(
        client,
        "GET",
        _github_repo_url(env, repository, "/issues"),
        provider="GitHub",
        headers=_github_headers(credential),
        params=params,
    )
    if response.status_code != 200:
        raise _github_failure(response, repository)
    try:
        issues = response.json()
    except ValueError:
        raise ProviderUnavailable("GitHub sent an answer that is not JSON.") from None
    marker = _marker(job)
    for issue in issues if isinstance(issues, list) else []:
        if isinstance(issue, dict) and "pull_request" not in issue and marker in str(issue.get("body") or ""):
            return str(issue.get("html_url") or issue.get("number"))
    return None


def _fence(lines: list[str]) -> str:
    text = "\n".join(lines).replace("```", "'''")
    return f"```text\n{text}\n```" if text else ""


async def _send_github(client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment) -> Sent:
    if job.attempts > 1:
        existing = await _find_github_issue(client, credential, job, env)
        if existing is not None:
            return Sent(external_ref=existing, found_existing=True)
    message = _message(job.item)
    repository = str(job.target.get("repository", ""))
    body = "\n\n".join(
        part
        for part in (
            f"**{message.label}** from HiredHands ({idempotency_ref(job)})",
            # Visitor-supplied text goes in a code block: no @mentions, no markdown tricks.
            _fence(message.lines),
            _marker(job),
        )
        if part
    )
    response = await _call(
        client,
        "POST",
        _github_repo_url(env, repository, "/issues"),
        provider="GitHub",
        headers=_github_headers(credential),
        json={"title": f"[{message.label}] {message.title}"[:256], "body": body[:60000]},
    )
    if response.status_code == 201:
        data = _json_object(response, provider="GitHub")
        return Sent(external_ref=str(data.get("html_url") or data.get("number")))
    raise _github_failure(response, repository)


# ---------------------------------------------------------------------------------------------
# Notion pages.
# ---------------------------------------------------------------------------------------------

_NOTION_CODES: Final = frozenset(
    {
        "invalid_json",
        "invalid_request_url",
        "invalid_request",
        "validation_error",
        "missing_version",
        "unauthorized",
        "restricted_resource",
        "object_not_found",
        "conflict_error",
        "rate_limited",
        "internal_server_error",
        "service_unavailable",
        "database_connection_unavailable",
        "gateway_timeout",
    }
)


def _notion_headers(credential: Credential) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential.token}", "Notion-Version": NOTION_VERSION}


def _notion_failure(response: httpx.Response) -> ProviderFailure:
    status = response.status_code
    try:
        code = str(response.json().get("code", ""))
    except (ValueError, AttributeError):
        code = ""
    code = code if code in _NOTION_CODES else ""
    shown = f"HTTP {status}{' ' + code if code else ''}"
    if status == 409:
        return ProviderUnavailable(f"Notion reported a conflict ({shown}).", status=status)
    transient = _transient(response, "Notion")
    if transient is not None:
        return transient
    if status == 401:
        return CredentialRejected(f"Notion rejected the token ({shown}): it is invalid or was revoked.", status=status)
    if status == 403:
        return CredentialRejected(
            f"Notion does not allow the integration to do this ({shown}): give it the read and insert content "
            "capabilities.",
            status=status,
        )
    if status == 404:
        return CredentialRejected(
            f"Notion cannot find the parent page or database ({shown}): share it with the integration.",
            status=status,
        )
    return _redirect(response, "Notion") or RequestRejected(f"Notion refused the request ({shown}).", status=status)


async def _verify_notion(
    client: HttpClient, credential: Credential, target: Mapping[str, Any], env: ProviderEnvironment
) -> Verified:
    headers = _notion_headers(credential)
    me = await _call(client, "GET", f"{env.notion_api}/v1/users/me", provider="Notion", headers=headers)
    if me.status_code != 200:
        raise _notion_failure(me)
    bot = _json_object(me, provider="Notion")
    parent_type = str(target.get("parent_type", ""))
    parent_id = str(target.get("parent_id", ""))
    collection = "databases" if parent_type == "database" else "pages"
    parent = await _call(
        client,
        "GET",
        f"{env.notion_api}/v1/{collection}/{urllib.parse.quote(parent_id, safe='-')}",
        provider="Notion",
        headers=headers,
    )
    if parent.status_code != 200:
        raise _notion_failure(parent)
    stored: dict[str, Any] = {
        "parent_type": parent_type,
        "parent_id": parent_id,
        "bot_id": str(bot.get("id") or "")[:64],
        "workspace_name": str((bot.get("bot") or {}).get("workspace_name") or "")[:200],
    }
    if parent_type == "database":
        properties = _json_object(parent, provider="Notion").get("properties") or {}
        title = next(
            (name for name, prop in properties.items() if isinstance(prop, dict) and prop.get("type") == "title"),
            None,
        )
        if title is None:
            raise CredentialRejected("The Notion database has no title property to write to.")
        stored["title_property"] = str(title)[:200]
    return Verified(target=stored)


def _notion_title(job: DeliveryJob) -> str:
    message = _message(job.item)
    return f"{message.label}: {message.title}"[:1900] + f" ({idempotency_ref(job)})"


async def _find_notion_page(
    client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment
) -> str | None:
    """After an attempt that may have reached Notion: the page it created, found by its reference."""
    ref = idempotency_ref(job)
    headers = _notion_headers(credential)
    parent_id = str(job.target.get("parent_id", ""))
    if job.target.get("parent_type") == "database":
        response = await _call(
            client,
            "POST",
            f"{env.notion_api}/v1/databases/{urllib.parse.quote(parent_id, safe='-')}/query",
            provider="Notion",
            headers=headers,
            json={"filter": {"property": job.target.get("title_property"), "title": {"contains": ref}}, "page_size": 5},
        )
        if response.status_code != 200:
            raise _notion_failure(response)
        for page in _json_object(response, provider="Notion").get("results") or []:
            if isinstance(page, dict) and page.get("id"):
                return str(page.get("url") or page["id"])
        return None
    cursor: str | None = None
    for _ in range(10):  # newest children come last; ten pages of 100 cover any retry window
        params = {"page_size": "100", **({"start_cursor": cursor} if cursor else {})}
        response = await _call(
            client,
            "GET",
            f"{env.notion_api}/v1/blocks/{urllib.parse.quote(parent_id, safe='-')}/children",
            provider="Notion",
            headers=headers,
            params=params,
        )
        if response.status_code != 200:
            raise _notion_failure(response)
        data = _json_object(response, provider="Notion")
        for block in data.get("results") or []:
            if (
                isinstance(block, dict)
                and block.get("type") == "child_page"
                and ref in str((block.get("child_page") or {}).get("title") or "")
            ):
                return "https://www.notion.so/" + str(block.get("id", "")).replace("-", "")
        if not data.get("has_more"):
            return None
        cursor = str(data.get("next_cursor") or "") or None
    return None


async def _send_notion(client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment) -> Sent:
    if job.attempts > 1:
        existing = await _find_notion_page(client, credential, job, env)
        if existing is not None:
            return Sent(external_ref=existing, found_existing=True)
    title = [{"type": "text", "text": {"content": _notion_title(job)}}]
    if job.target.get("parent_type") == "database":
        parent = {"database_id": str(job.target.get("parent_id"))}
        properties = {str(job.target.get("title_property") or "Name"): {"title": title}}
    else:
        parent = {"page_id": str(job.target.get("parent_id"))}
        properties = {"title": {"title": title}}
    children = [
        {
            "object": "block",
            "type": "paragraph",
            "paragraph": {"rich_text": [{"type": "text", "text": {"content": line[:2000]}}]},
        }
        for line in _message(job.item).lines[:50]
    ]
    response = await _call(
        client,
        "POST",
        f"{env.notion_api}/v1/pages",
        provider="Notion",
        headers=_notion_headers(credential),
        json={"parent": parent, "properties": properties, "children": children},
    )
    if response.status_code == 200:
        data = _json_object(response, provider="Notion")
        return Sent(external_ref=str(data.get("url") or data.get("id") or "") or None)
    raise _notion_failure(response)


# ---------------------------------------------------------------------------------------------
# Custom webhooks, signed per Standard Webhooks.
# ---------------------------------------------------------------------------------------------

_SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - a format prefix, not a secret


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (24 to 64 random bytes)."""
    if not secret.startswith(_SECRET_PREFIX):
        raise ValueError("signing secrets start with whsec_")
    try:
        key = base64.b64decode(secret[len(_SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the signing secret is not base64 after whsec_") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("the signing secret must encode 24 to 64 bytes")
    return key


def sign(secret: str, *, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    mac = hmac.new(signing_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def signed_request(secret: str, *, message_id: str, event: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id=message_id, timestamp=timestamp, body=body),
    }
    return body, headers


def _webhook_failure(response: httpx.Response) -> ProviderFailure:
    status = response.status_code
    transient = _transient(response, "The endpoint")
    if transient is not None:
        return transient
    if status in (401, 403, 404, 410):
        return CredentialRejected(f"The endpoint refused the delivery (HTTP {status}).", status=status)
    return _redirect(response, "The endpoint") or RequestRejected(
        f"The endpoint refused the delivery (HTTP {status}).", status=status
    )


async def _post_webhook(
    client: HttpClient, credential: Credential, *, message_id: str, event: Mapping[str, Any]
) -> httpx.Response:
    body, headers = signed_request(credential.secret or "", message_id=message_id, event=event)
    return await _call(client, "POST", credential.url or "", provider="The endpoint", content=body, headers=headers)


async def _verify_webhook(client: HttpClient, credential: Credential, env: ProviderEnvironment) -> Verified:
    try:
        signing_key(credential.secret or "")
    except ValueError as exc:
        raise CredentialRejected(f"The signing secret is not valid: {exc}.") from None
    url = await _check_customer_url(credential.url or "", env=env, hosts=None, path=None, what="webhook URL")
    message_id = "msg_ping_" + hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:24]
    event = {"type": "ping", "timestamp": _now_iso(), "data": {}}
    response = await _post_webhook(client, credential, message_id=message_id, event=event)
    if 200 <= response.status_code < 300:
        return Verified(target={"host": url.host})
    raise _webhook_failure(response)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def webhook_event(job: DeliveryJob) -> dict[str, Any]:
    item = job.item
    return {
        "type": "review_item.created",
        "timestamp": _now_iso(),
        "data": {
            "id": str(item.id),
            "org_id": str(item.org_id),
            "kind": item.kind,
            "title": item.title,
            "payload": item.payload,
            "created_at": item.created_at.isoformat(),
        },
    }


async def _send_webhook(client: HttpClient, credential: Credential, job: DeliveryJob) -> Sent:
    # The message id is the delivery's idempotency key, the same on every retry: receivers dedupe on it.
    message_id = "msg_" + job.idempotency_key.hex
    response = await _post_webhook(client, credential, message_id=message_id, event=webhook_event(job))
    if 200 <= response.status_code < 300:
        return Sent(external_ref=message_id)
    raise _webhook_failure(response)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


async def verify(
    kind: Kind,
    credential: Credential,
    target: Mapping[str, Any],
    *,
    client: HttpClient,
    env: ProviderEnvironment,
) -> Verified:
    """Prove the credential works and reaches its target, or raise a ProviderFailure."""
    if kind == "slack_webhook":
        return await _verify_slack(client, credential, env)
    if kind == "discord_webhook":
        return await _verify_discord(client, credential, env)
    if kind == "github":
        return await _verify_github(client, credential, target, env)
    if kind == "notion":
        return await _verify_notion(client, credential, target, env)
    return await _verify_webhook(client, credential, env)


async def send(job: DeliveryJob, credential: Credential, *, client: HttpClient, env: ProviderEnvironment) -> Sent:
    """Deliver one review item; the guarded client re-checks the destination on this very send."""
    if job.kind == "slack_webhook":
        return await _send_slack(client, credential, job)
    if job.kind == "discord_webhook":
        return await _send_discord(client, credential, job)
    if job.kind == "github":
        return await _send_github(client, credential, job, env)
    if job.kind == "notion":
        return await _send_notion(client, credential, job, env)
    return await _send_webhook(client, credential, job)
