"""GitHub issues."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx

from shared.connections.errors import CredentialRejected, ProviderFailure, ProviderUnavailable, RequestRejected
from shared.connections.providers.common import (
    GITHUB_API_VERSION,
    HttpClient,
    ProviderEnvironment,
    Sent,
    Verified,
    call,
    idempotency_ref,
    json_object,
    message_for,
    redirect_refusal,
    retry_after,
    transient_failure,
)
from shared.connections.schemas import Credential, DeliveryJob


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
            f"GitHub is rate limiting us (HTTP {status}).", status=status, retry_after=retry_after(response)
        )
    transient = transient_failure(response, "GitHub")
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
    return redirect_refusal(response, "GitHub") or RequestRejected(
        f"GitHub refused the request for {repository} (HTTP {status}).", status=status
    )


def _github_repo_url(env: ProviderEnvironment, repository: str, suffix: str = "") -> str:
    owner, name = repository.split("/", 1)
    return f"{env.github_api}/repos/{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(name, safe='')}{suffix}"


async def verify(
    client: HttpClient, credential: Credential, target: Mapping[str, Any], env: ProviderEnvironment
) -> Verified:
    repository = str(target.get("repository", ""))
    headers = _github_headers(credential)
    me = await call(client, "GET", f"{env.github_api}/user", provider="GitHub", headers=headers)
    if me.status_code != 200:
        raise _github_failure(me, repository)
    login = str(json_object(me, provider="GitHub").get("login") or "")[:100]
    # Classic tokens list their scopes; fine-grained tokens send no such header (and are scoped
    # per repository instead, which the repository read below checks).
    scopes_header = me.headers.get("x-oauth-scopes")
    scopes = {s.strip() for s in scopes_header.split(",")} if scopes_header is not None else None

    repo = await call(client, "GET", _github_repo_url(env, repository), provider="GitHub", headers=headers)
    if repo.status_code != 200:
        raise _github_failure(repo, repository)
    data = json_object(repo, provider="GitHub")
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
    response = await call(
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


async def send(client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment) -> Sent:
    if job.attempts > 1:
        existing = await _find_github_issue(client, credential, job, env)
        if existing is not None:
            return Sent(external_ref=existing, found_existing=True)
    message = message_for(job.item)
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
    response = await call(
        client,
        "POST",
        _github_repo_url(env, repository, "/issues"),
        provider="GitHub",
        headers=_github_headers(credential),
        json={"title": f"[{message.label}] {message.title}"[:256], "body": body[:60000]},
    )
    if response.status_code == 201:
        data = json_object(response, provider="GitHub")
        return Sent(external_ref=str(data.get("html_url") or data.get("number")))
    raise _github_failure(response, repository)
