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

from collections.abc import Mapping
from typing import Any

from shared.connections.providers import discord, github, notion, slack, webhook
from shared.connections.providers.common import (
    DELIVERY_POLICY,
    PRODUCTION,
    DestinationRefused,
    HttpClient,
    ProviderEnvironment,
    Sent,
    Verified,
    get_provider_environment,
    idempotency_ref,
    secret_hint,
)
from shared.connections.schemas import Credential, DeliveryJob, Kind

__all__ = [
    "DELIVERY_POLICY",
    "PRODUCTION",
    "DestinationRefused",
    "HttpClient",
    "ProviderEnvironment",
    "Sent",
    "Verified",
    "get_provider_environment",
    "idempotency_ref",
    "secret_hint",
    "send",
    "verify",
]


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
        return await slack.verify(client, credential, env)
    if kind == "discord_webhook":
        return await discord.verify(client, credential, env)
    if kind == "github":
        return await github.verify(client, credential, target, env)
    if kind == "notion":
        return await notion.verify(client, credential, target, env)
    return await webhook.verify(client, credential, env)


async def send(job: DeliveryJob, credential: Credential, *, client: HttpClient, env: ProviderEnvironment) -> Sent:
    """Deliver one review item; the guarded client re-checks the destination on this very send."""
    if job.kind == "slack_webhook":
        return await slack.send(client, credential, job)
    if job.kind == "discord_webhook":
        return await discord.send(client, credential, job)
    if job.kind == "github":
        return await github.send(client, credential, job, env)
    if job.kind == "notion":
        return await notion.send(client, credential, job, env)
    return await webhook.send(client, credential, job)
