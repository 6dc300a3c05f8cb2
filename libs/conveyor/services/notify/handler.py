"""notify's decisions: who gets told, what the webhook says, how it is signed, what retries.

A batch's webhooks are claimed one by one in the store, then sent together (the sender runs
them concurrently under the destination policy, each within one deadline), then settled: a 2xx
completes the claim; 429, 5xx, timeouts and unreachable receivers release it and retry through
the ladder; a refused destination, a redirect (never followed) or another 4xx release it and
dead-letter the task's notification with the reason in its timeline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry.trace import Span

from conveyor.errors import PermanentError, RetryableError
from conveyor.events.catalog import NOTIFIED_TYPE as NOTIFIED
from conveyor.events.model import TRACEPARENT, TRACESTATE, Event
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.services.notify.settings import NotifySettings
from conveyor.store.base import NOTIFICATION_CLAIMED
from conveyor.telemetry import tracing
from conveyor.webhooks.policy import redact
from conveyor.webhooks.sender import WebhookRequest
from conveyor.webhooks.signing import sign


@dataclass(frozen=True, slots=True)
class _Pending:
    """A claimed webhook waiting for its answer."""

    index: int
    event: Event
    request: WebhookRequest


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


def handle_batch(events: Sequence[Event], ctx: StageContext[NotifySettings]) -> list[BatchOutcome]:
    outcomes: list[BatchOutcome] = [None] * len(events)
    records = tracing.batch_records()
    spans = records if len(records) == len(events) else ()
    pending: list[_Pending] = []
    for index, event in enumerate(events):
        try:
            prepared = _prepare(event, ctx, spans[index] if spans else None)
        except Exception as exc:
            outcomes[index] = exc
            continue
        if isinstance(prepared, WebhookRequest):
            pending.append(_Pending(index, event, prepared))
        else:
            outcomes[index] = prepared

    def settle(position: int, result: int | Exception) -> None:
        # Recorded as each answer comes, not after the slowest receiver: a crash repeats only
        # the webhooks still in flight.
        # A store fault while recording one answer fails that record alone (it retries), never
        # the batch: a raising batch is re-run record by record, and every webhook of it still
        # claimed would then wait out its lease and be sent again.
        item = pending[position]
        try:
            outcomes[item.index] = _settle(item.event, result, ctx)
        except Exception as exc:
            outcomes[item.index] = exc

    ctx.resources["webhooks"].deliver([p.request for p in pending], settle)
    return outcomes


def _prepare(
    event: Event, ctx: StageContext[NotifySettings], span: Span | None
) -> WebhookRequest | Emit | None:
    """The signed request for `event` after claiming it; or its outcome if none is sent."""
    s = ctx.settings
    task = event.data["task"]
    url = task.get("callback_url")
    if not url:
        return _notified(event, "none", None)
    keys = s.webhook_keys(task["tenant"])
    if not keys:
        raise PermanentError(f"no webhook secret configured for tenant {task['tenant']!r}")
    store = ctx.resources["store"]
    tenant = task["tenant"]  # a task is (tenant, task id): so is its one notification
    claimed = store.claim_notification(
        task["task_id"], event.id, url, tenant=tenant, lease_s=s.claim_lease_s
    )
    if not claimed:
        held = store.notification(task["task_id"], tenant=tenant)
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
    body = body_of(event)
    # webhook-id is the stored event's id: the same on every attempt, for receivers to dedupe.
    headers = {"Content-Type": "application/json", **sign(keys, event.id, body)}
    return WebhookRequest(
        url,
        body,
        headers,
        parent=_parent(span, event),
        traceparent=event.ext(TRACEPARENT),
        tracestate=event.ext(TRACESTATE),
        attributes={"conveyor.task_id": task["task_id"], "conveyor.tenant": task["tenant"]},
    )


def _parent(span: Span | None, event: Event) -> Span | None:
    """The record's span when it has a context; else the task's trace (SDK off, or a runtime
    that gave no record spans), so the webhook carries the task's trace context either way."""
    if span is not None and span.get_span_context().is_valid:
        return span
    start = event.ext(TRACEPARENT)
    return tracing.remote_span(start, event.ext(TRACESTATE)) if start else None


def _settle(
    event: Event, result: int | Exception, ctx: StageContext[NotifySettings]
) -> BatchOutcome:
    task_id, tenant = event.data["task"]["task_id"], event.data["task"]["tenant"]
    store = ctx.resources["store"]
    if isinstance(result, int) and 200 <= result < 300:
        store.complete_notification(task_id, result, tenant=tenant)
        return _notified(event, "webhook", result)
    store.release_notification(task_id, tenant=tenant)
    if isinstance(result, Exception):
        return result  # a policy refusal is permanent; network failures are retryable
    where = redact(event.data["task"]["callback_url"])
    if result >= 500 or result == 429:
        return RetryableError(f"webhook to {where} answered {result}")
    if 300 <= result < 400:
        return PermanentError(f"webhook to {where} answered {result}: redirects are not followed")
    return PermanentError(f"webhook to {where} answered {result}")


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
    from conveyor.webhooks.policy import DestinationPolicy
    from conveyor.webhooks.sender import WebhookSender

    sender = WebhookSender(
        DestinationPolicy(settings.webhook_allow),
        timeout_s=settings.webhook_timeout_s,
        max_answer_bytes=settings.webhook_max_answer_bytes,
        concurrency=settings.webhook_concurrency,
        ca_file=settings.webhook_ca_file,
    )
    return {"store": open_store(settings.store_url), "webhooks": sender}
