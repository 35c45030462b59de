"""Discord webhooks."""

from __future__ import annotations

import re
from typing import Final

import httpx

from shared.connections.errors import CredentialRejected, ProviderFailure, ProviderUnavailable, RequestRejected
from shared.connections.providers.common import (
    HttpClient,
    ProviderEnvironment,
    Sent,
    Verified,
    call,
    check_customer_url,
    json_object,
    message_for,
    redirect_refusal,
    retry_after,
    transient_failure,
)
from shared.connections.schemas import Credential, DeliveryJob

_DISCORD_PATH: Final = re.compile(r"^/api(?:/v\d{1,2})?/webhooks/(\d{5,25})/([A-Za-z0-9_-]{20,100})$")


def _discord_failure(response: httpx.Response) -> ProviderFailure:
    status = response.status_code
    if status == 429:
        retry = retry_after(response)
        if retry is None:
            try:
                retry = float(response.json().get("retry_after"))
            except (ValueError, TypeError, AttributeError):
                retry = None
        return ProviderUnavailable("Discord is rate limiting us (HTTP 429).", status=status, retry_after=retry)
    transient = transient_failure(response, "Discord")
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
    return redirect_refusal(response, "Discord") or RequestRejected(
        f"Discord refused the message (HTTP {status}).", status=status
    )


async def verify(client: HttpClient, credential: Credential, env: ProviderEnvironment) -> Verified:
    url = await check_customer_url(
        credential.url or "", env=env, hosts=env.discord_hosts, path=_DISCORD_PATH, what="Discord webhook URL"
    )
    response = await call(client, "GET", str(url), provider="Discord")
    if response.status_code != 200:
        raise _discord_failure(response)
    data = json_object(response, provider="Discord")
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


async def send(client: HttpClient, credential: Credential, job: DeliveryJob) -> Sent:
    message = message_for(job.item)
    content = f"**{message.label}:** {message.title}"
    if message.lines:
        content += "\n" + "\n".join(message.lines)
    body = {"content": content[:2000], "allowed_mentions": {"parse": []}}  # visitor text never pings anyone
    response = await call(client, "POST", credential.url or "", provider="Discord", params={"wait": "true"}, json=body)
    if response.status_code == 200:
        return Sent(external_ref=str(json_object(response, provider="Discord").get("id") or "") or None)
    if response.status_code == 204:
        return Sent(external_ref=None)
    raise _discord_failure(response)
