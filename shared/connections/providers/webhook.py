"""Custom webhooks, signed per Standard Webhooks."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any, Final

import httpx

from shared.connections.errors import CredentialRejected, ProviderFailure, RequestRejected
from shared.connections.providers.common import (
    HttpClient,
    ProviderEnvironment,
    Sent,
    Verified,
    call,
    check_customer_url,
    redirect_refusal,
    transient_failure,
)
from shared.connections.schemas import Credential, DeliveryJob

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
    transient = transient_failure(response, "The endpoint")
    if transient is not None:
        return transient
    if status in (401, 403, 404, 410):
        return CredentialRejected(f"The endpoint refused the delivery (HTTP {status}).", status=status)
    return redirect_refusal(response, "The endpoint") or RequestRejected(
        f"The endpoint refused the delivery (HTTP {status}).", status=status
    )


async def _post_webhook(
    client: HttpClient, credential: Credential, *, message_id: str, event: Mapping[str, Any]
) -> httpx.Response:
    body, headers = signed_request(credential.secret or "", message_id=message_id, event=event)
    return await call(client, "POST", credential.url or "", provider="The endpoint", content=body, headers=headers)


async def verify(client: HttpClient, credential: Credential, env: ProviderEnvironment) -> Verified:
    try:
        signing_key(credential.secret or "")
    except ValueError as exc:
        raise CredentialRejected(f"The signing secret is not valid: {exc}.") from None
    url = await check_customer_url(credential.url or "", env=env, hosts=None, path=None, what="webhook URL")
    message_id = "msg_ping_" + hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:24]
    event = {"type": "ping", "timestamp": now_iso(), "data": {}}
    response = await _post_webhook(client, credential, message_id=message_id, event=event)
    if 200 <= response.status_code < 300:
        return Verified(target={"host": url.host})
    raise _webhook_failure(response)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def webhook_event(job: DeliveryJob) -> dict[str, Any]:
    item = job.item
    return {
        "type": "review_item.created",
        "timestamp": now_iso(),
        "data": {
            "id": str(item.id),
            "org_id": str(item.org_id),
            "kind": item.kind,
            "title": item.title,
            "payload": item.payload,
            "created_at": item.created_at.isoformat(),
        },
    }


async def send(client: HttpClient, credential: Credential, job: DeliveryJob) -> Sent:
    # The message id is the delivery's idempotency key, the same on every retry: receivers dedupe on it.
    message_id = "msg_" + job.idempotency_key.hex
    response = await _post_webhook(client, credential, message_id=message_id, event=webhook_event(job))
    if 200 <= response.status_code < 300:
        return Sent(external_ref=message_id)
    raise _webhook_failure(response)
