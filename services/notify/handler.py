"""notify's decisions: who gets told, what the webhook says, how it is signed, what retries."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

import httpx

from conveyor.errors import PermanentError, RetryableError
from conveyor.events.model import Event
from conveyor.runtime import Emit, StageContext
from conveyor.store.base import NOTIFICATION_CLAIMED
from conveyor.telemetry.tracing import inject_current, span
from services.notify.settings import NotifySettings

NOTIFIED = "conveyor.task.notified.v1"
SIGNATURE_HEADER = "X-Conveyor-Signature"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_of(event: Event) -> bytes:
    data = event.data
    task = data["task"]
    summary = {
        "task_id": task["task_id"],
        "tenant": task["tenant"],
        "kind": task["kind"],
        "status": data["status"],
        "verdict": data["verdict"],
        "result": json.loads(data["result"]) if data["result"] else None,
        "error": data["error"],
        "event_id": event.id,
    }
    return json.dumps(summary, separators=(",", ":"), sort_keys=True).encode()


def handle(event: Event, ctx: StageContext[NotifySettings]) -> Emit | None:
    s = ctx.settings
    task = event.data["task"]
    url = task.get("callback_url")
    if not url:
        return _notified(event, "none", None)
    store = ctx.resources["store"]
    if not store.claim_notification(task["task_id"], event.id, url, lease_s=s.claim_lease_s):
        held = store.notification(task["task_id"])
        if held is not None and held.status == NOTIFICATION_CLAIMED:
            # A sender died between its claim and the answer (it may or may not have sent):
            # retry through the ladder until the lease lapses and the claim is taken over.
            # Skipping here would lose the notification if the request never went out.
            raise RetryableError(
                f"notification of {task['task_id']} claimed at {held.claimed_at.isoformat()} "
                f"by a sender that has not finished; taken over after {s.claim_lease_s:g} s"
            )
        ctx.log.info("notification skipped task_id=%s reason=already-notified", task["task_id"])
        return None
    secret = s.webhook_secrets.get(task["tenant"], s.webhook_default_secret)
    if not secret:
        store.release_notification(task["task_id"])
        raise PermanentError(f"no webhook secret configured for tenant {task['tenant']!r}")
    body = body_of(event)
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, body),
        "X-Conveyor-Event-Id": event.id,
        "X-Conveyor-Task-Id": task["task_id"],
    }
    client: httpx.Client = ctx.resources["http"]
    try:
        with span("webhook POST", {"http.request.method": "POST", "url.full": url}) as posting:
            # The receiver can join the task's trace: W3C traceparent on the request.
            headers.update(inject_current())
            response = client.post(url, content=body, headers=headers, timeout=s.webhook_timeout_s)
            posting.set_attribute("http.response.status_code", response.status_code)
    except httpx.HTTPError as exc:
        store.release_notification(task["task_id"])
        raise RetryableError(f"webhook to {url} failed: {type(exc).__name__}") from exc
    code = response.status_code
    if code >= 500 or code == 429:
        store.release_notification(task["task_id"])
        raise RetryableError(f"webhook answered {code}")
    if code >= 400:
        store.release_notification(task["task_id"])
        raise PermanentError(f"webhook answered {code}")
    store.complete_notification(task["task_id"], code)
    return _notified(event, "webhook", code)


def _notified(event: Event, channel: str, http_status: int | None) -> Emit:
    task = event.data["task"]
    return Emit(
        NOTIFIED,
        {
            "task_id": task["task_id"],
            "tenant": task["tenant"],
            "status": event.data["status"],
            "channel": channel,
            "http_status": http_status,
            "delivered_at": datetime.now(UTC).isoformat(),
        },
    )


def resources(settings: NotifySettings) -> dict[str, Any]:
    from conveyor.store import open_store

    # Redirects are not followed: a webhook answers where it was registered.
    return {
        "store": open_store(settings.store_url),
        "http": httpx.Client(follow_redirects=False, timeout=settings.webhook_timeout_s),
    }
