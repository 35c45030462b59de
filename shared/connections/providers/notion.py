"""Notion pages."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

import httpx

from shared.connections.errors import CredentialRejected, ProviderFailure, ProviderUnavailable, RequestRejected
from shared.connections.providers.common import (
    NOTION_VERSION,
    HttpClient,
    ProviderEnvironment,
    Sent,
    Verified,
    call,
    idempotency_ref,
    json_object,
    message_for,
    redirect_refusal,
    transient_failure,
)
from shared.connections.schemas import Credential, DeliveryJob

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
    transient = transient_failure(response, "Notion")
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
    return redirect_refusal(response, "Notion") or RequestRejected(
        f"Notion refused the request ({shown}).", status=status
    )


async def verify(
    client: HttpClient, credential: Credential, target: Mapping[str, Any], env: ProviderEnvironment
) -> Verified:
    headers = _notion_headers(credential)
    me = await call(client, "GET", f"{env.notion_api}/v1/users/me", provider="Notion", headers=headers)
    if me.status_code != 200:
        raise _notion_failure(me)
    bot = json_object(me, provider="Notion")
    parent_type = str(target.get("parent_type", ""))
    parent_id = str(target.get("parent_id", ""))
    collection = "databases" if parent_type == "database" else "pages"
    parent = await call(
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
        properties = json_object(parent, provider="Notion").get("properties") or {}
        title = next(
            (name for name, prop in properties.items() if isinstance(prop, dict) and prop.get("type") == "title"),
            None,
        )
        if title is None:
            raise CredentialRejected("The Notion database has no title property to write to.")
        stored["title_property"] = str(title)[:200]
    return Verified(target=stored)


def _notion_title(job: DeliveryJob) -> str:
    message = message_for(job.item)
    return f"{message.label}: {message.title}"[:1900] + f" ({idempotency_ref(job)})"


async def _find_notion_page(
    client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment
) -> str | None:
    """After an attempt that may have reached Notion: the page it created, found by its reference."""
    ref = idempotency_ref(job)
    headers = _notion_headers(credential)
    parent_id = str(job.target.get("parent_id", ""))
    if job.target.get("parent_type") == "database":
        response = await call(
            client,
            "POST",
            f"{env.notion_api}/v1/databases/{urllib.parse.quote(parent_id, safe='-')}/query",
            provider="Notion",
            headers=headers,
            json={"filter": {"property": job.target.get("title_property"), "title": {"contains": ref}}, "page_size": 5},
        )
        if response.status_code != 200:
            raise _notion_failure(response)
        for page in json_object(response, provider="Notion").get("results") or []:
            if isinstance(page, dict) and page.get("id"):
                return str(page.get("url") or page["id"])
        return None
    cursor: str | None = None
    for _ in range(10):  # newest children come last; ten pages of 100 cover any retry window
        params = {"page_size": "100", **({"start_cursor": cursor} if cursor else {})}
        response = await call(
            client,
            "GET",
            f"{env.notion_api}/v1/blocks/{urllib.parse.quote(parent_id, safe='-')}/children",
            provider="Notion",
            headers=headers,
            params=params,
        )
        if response.status_code != 200:
            raise _notion_failure(response)
        data = json_object(response, provider="Notion")
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


async def send(client: HttpClient, credential: Credential, job: DeliveryJob, env: ProviderEnvironment) -> Sent:
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
        for line in message_for(job.item).lines[:50]
    ]
    response = await call(
        client,
        "POST",
        f"{env.notion_api}/v1/pages",
        provider="Notion",
        headers=_notion_headers(credential),
        json={"parent": parent, "properties": properties, "children": children},
    )
    if response.status_code == 200:
        data = json_object(response, provider="Notion")
        return Sent(external_ref=str(data.get("url") or data.get("id") or "") or None)
    raise _notion_failure(response)
