"""Slack incoming webhooks."""

from __future__ import annotations

import re
from typing import Final

import httpx

from shared.connections.errors import CredentialRejected, ProviderFailure, RequestRejected
from shared.connections.providers.common import (
    HttpClient,
    ProviderEnvironment,
    Sent,
    Verified,
    call,
    check_customer_url,
    message_for,
    redirect_refusal,
    transient_failure,
)
from shared.connections.schemas import Credential, DeliveryJob

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
    transient = transient_failure(response, "Slack")
    if transient is not None:
        return transient
    if status in (401, 403, 404, 410):
        why = _SLACK_GONE.get(code, "the webhook no longer works")
        return CredentialRejected(
            f"Slack refused the webhook (HTTP {status}{' ' + code if code else ''}): {why}.", status=status
        )
    return redirect_refusal(response, "Slack") or RequestRejected(
        f"Slack refused the message (HTTP {status}{' ' + code if code else ''}).", status=status
    )


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn control characters: escaping them also stops <!channel>-style pings.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


async def verify(client: HttpClient, credential: Credential, env: ProviderEnvironment) -> Verified:
    url = await check_customer_url(
        credential.url or "", env=env, hosts=env.slack_hosts, path=_SLACK_PATH, what="Slack webhook URL"
    )
    response = await call(client, "POST", str(url), provider="Slack", json={})
    if response.status_code == 200 or (response.status_code == 400 and _slack_code(response) in _SLACK_EMPTY_REFUSALS):
        return Verified(target={"host": url.host})
    raise _slack_failure(response)


async def send(client: HttpClient, credential: Credential, job: DeliveryJob) -> Sent:
    message = message_for(job.item)
    text = f"*{message.label}:* {_slack_escape(message.title)}"
    if message.lines:
        text += "\n" + "\n".join(_slack_escape(line) for line in message.lines)
    response = await call(client, "POST", credential.url or "", provider="Slack", json={"text": text[:3900]})
    if response.status_code == 200:
        return Sent(external_ref=None)
    raise _slack_failure(response)
