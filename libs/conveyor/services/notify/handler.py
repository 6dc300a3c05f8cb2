"""notify's decisions: who gets told, what the webhook says, how it is signed, what retries.

A batch's webhooks are claimed one by one in the store, then sent together (the sender runs
them concurrently under the destination policy, each within one deadline), then settled: a 2xx
completes the claim; 429, 5xx, timeouts and unreachable receivers release it and retry through
the ladder; a refused destination, a redirect (never followed) or another 4xx release it and
dead-letter the task's notification with the reason in its timeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry.trace import Span

from conveyor.errors import PermanentError, RetryableError
from conveyor.events.model import TRACEPARENT, TRACESTATE, Event
from conveyor.events.payloads import TaskNotified, TaskStored
from conveyor.runtime import Emit
from conveyor.runtime.handler import BatchOutcome
from conveyor.runtime.typed import Context, Record, emit
from conveyor.services.notify.settings import NotifySettings
from conveyor.store.base import NOTIFICATION_CLAIMED, ResultStore
from conveyor.telemetry import tracing
from conveyor.webhooks.policy import redact
from conveyor.webhooks.sender import WebhookRequest
from conveyor.webhooks.signing import sign

Stored = Record[TaskStored]


class Webhooks(Protocol):
    """What notify sends with (`conveyor.webhooks.sender.WebhookSender`)."""

    def deliver(
        self,
        requests: Sequence[WebhookRequest],
        on_result: Callable[[int, int | Exception], None],
    ) -> list[int | Exception]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class NotifyResources:
    """notify's store (the notification claims) and webhook sender."""

    store: ResultStore
    webhooks: Webhooks


NotifyContext = Context[NotifySettings, NotifyResources]


@dataclass(frozen=True, slots=True)
class _Pending:
    """A claimed webhook waiting for its answer."""

    index: int
    record: Stored
    request: WebhookRequest


def body_of(record: Stored) -> bytes:
    data, task = record.data, record.data.task
    summary = {
        "task_id": task.task_id,
        "tenant": task.tenant,
        "kind": task.kind,
        "status": data.status.value,
        "verdict": data.verdict,
        "result": json.loads(data.result) if data.result else None,
        "error": data.error,
        "event_id": record.event.id,
    }
    return json.dumps(summary, separators=(",", ":"), sort_keys=True).encode()


def handle_batch(records: Sequence[Stored], ctx: NotifyContext) -> list[BatchOutcome]:
    outcomes: list[BatchOutcome] = [None] * len(records)
    traced = tracing.batch_records()
    spans = traced if len(traced) == len(records) else ()
    pending: list[_Pending] = []
    for index, record in enumerate(records):
        try:
            prepared = _prepare(record, ctx, spans[index] if spans else None)
        except Exception as exc:
            outcomes[index] = exc
            continue
        if isinstance(prepared, WebhookRequest):
            pending.append(_Pending(index, record, prepared))
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
            outcomes[item.index] = _settle(item.record, result, ctx)
        except Exception as exc:
            outcomes[item.index] = exc

    ctx.resources.webhooks.deliver([p.request for p in pending], settle)
    return outcomes


def _prepare(record: Stored, ctx: NotifyContext, span: Span | None) -> WebhookRequest | Emit | None:
    """The signed request for `record` after claiming it; or its outcome if none is sent."""
    s, event, task = ctx.settings, record.event, record.data.task
    url = task.callback_url
    if not url:
        return _notified(record.data, "none", None)
    keys = s.webhook_keys(task.tenant)
    if not keys:
        raise PermanentError(f"no webhook secret configured for tenant {task.tenant!r}")
    store = ctx.resources.store
    tenant = task.tenant  # a task is (tenant, task id): so is its one notification
    claimed = store.claim_notification(
        task.task_id, event.id, url, tenant=tenant, lease_s=s.claim_lease_s
    )
    if not claimed:
        held = store.notification(task.task_id, tenant=tenant)
        if held is not None and held.status == NOTIFICATION_CLAIMED:
            # A sender died between its claim and the answer (it may or may not have sent):
            # retry through the ladder until the lease lapses and the claim is taken over.
            # Skipping here would lose the notification if the request never went out.
            raise RetryableError(
                f"notification of {task.task_id} claimed at {held.claimed_at.isoformat()} "
                f"by a sender that has not finished; taken over after {s.claim_lease_s:g} s"
            )
        ctx.log.info("notification skipped task_id=%s reason=already-notified", task.task_id)
        return None
    body = body_of(record)
    # webhook-id is the stored event's id: the same on every attempt, for receivers to dedupe.
    headers = {"Content-Type": "application/json", **sign(keys, event.id, body)}
    return WebhookRequest(
        url,
        body,
        headers,
        parent=_parent(span, event),
        traceparent=event.ext(TRACEPARENT),
        tracestate=event.ext(TRACESTATE),
        attributes={"conveyor.task_id": task.task_id, "conveyor.tenant": task.tenant},
    )


def _parent(span: Span | None, event: Event) -> Span | None:
    """The record's span when it has a context; else the task's trace (SDK off, or a runtime
    that gave no record spans), so the webhook carries the task's trace context either way."""
    if span is not None and span.get_span_context().is_valid:
        return span
    start = event.ext(TRACEPARENT)
    return tracing.remote_span(start, event.ext(TRACESTATE)) if start else None


def _settle(record: Stored, result: int | Exception, ctx: NotifyContext) -> BatchOutcome:
    task = record.data.task
    task_id, tenant = task.task_id, task.tenant
    store = ctx.resources.store
    if isinstance(result, int) and 200 <= result < 300:
        store.complete_notification(task_id, result, tenant=tenant)
        return _notified(record.data, "webhook", result)
    store.release_notification(task_id, tenant=tenant)
    if isinstance(result, Exception):
        return result  # a policy refusal is permanent; network failures are retryable
    where = redact(task.callback_url or "")
    if result >= 500 or result == 429:
        return RetryableError(f"webhook to {where} answered {result}")
    if 300 <= result < 400:
        return PermanentError(f"webhook to {where} answered {result}: redirects are not followed")
    return PermanentError(f"webhook to {where} answered {result}")


def _notified(data: TaskStored, channel: str, http_status: int | None) -> Emit:
    notified = TaskNotified(
        task_id=data.task.task_id,
        tenant=data.task.tenant,
        status=data.status,
        channel=channel,
        http_status=http_status,
        delivered_at=datetime.now(UTC).isoformat(),
    )
    return emit(notified)


def resources(settings: NotifySettings) -> NotifyResources:
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
    return NotifyResources(store=open_store(settings.store_url), webhooks=sender)
