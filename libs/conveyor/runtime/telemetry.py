"""`StageTelemetry`: the stage's tracing, metrics and event log behind the `StageHooks` seam.

Tracing: each record's consume span is a child of the context in its `traceparent` header (or
its CloudEvents attribute). Without the SDK there is no span to make: the router carries the
incoming context to the next hop as it is. Under a parent-based sampler a record whose parent
was not sampled gets no span either, only its parent's context, so unsampled records stay cheap
and still propagate. Metrics are counted per batch, not per record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span

from conveyor.events.catalog import INGRESS_TYPE as SUBMITTED
from conveyor.events.model import Event
from conveyor.kafka.protocols import Message
from conveyor.runtime.routing import Item, OutRecord
from conveyor.runtime.step import BatchResult, RecordOutcome
from conveyor.telemetry import tracing
from conveyor.telemetry.metrics import StageMetrics
from conveyor.telemetry.traceparent import trace_id_of
from conveyor.variants import SHADOW, VARIANT

log = logging.getLogger("conveyor.runtime.stage")


class StageTelemetry:
    def __init__(
        self,
        stage: str,
        group: str,
        metrics: StageMetrics | None = None,
        *,
        client_id: str = "",
        bootstrap: str = "",
    ) -> None:
        self.stage = stage
        self.group = group
        self.metrics = metrics or StageMetrics(stage)
        # Every consume span names the client and the broker it read from (the first
        # bootstrap address: which broker served a fetch is not known to the client API).
        self._client: dict[str, Any] = {"messaging.consumer.group.name": group}
        if client_id:
            self._client["messaging.client.id"] = client_id
        self._client.update(tracing.server_attributes(bootstrap))
        self._last_submitted: tuple[str, float] = ("", 0.0)

    # -- records ---------------------------------------------------------------------------

    def record_start(self, msg: Message, headers: Mapping[str, str], event: Event | None) -> Span:
        if not tracing.enabled():
            return INVALID_SPAN
        unsampled = tracing.unsampled_remote(headers)
        if unsampled is not None:
            return unsampled  # no span, no parsing: the parent is handed on as it came
        return tracing.record_span(
            f"process {msg.topic()}",
            parent=_parent(headers, event),
            attributes=lambda: self._span_attributes(msg, headers, event),
        )

    def record_finish(self, outcome: RecordOutcome, error: BaseException | None = None) -> None:
        item = outcome.item
        if outcome.failure is None:
            self._observe_e2e(item, time.time())
        elif item.span.is_recording():
            tracing.set_attributes(item.span, _failure_attributes(outcome))
        self._log_outcome(outcome)
        if item.span is not INVALID_SPAN:  # tracing off: no span to end
            tracing.end_span(item.span, error)

    def record_enter(self, item: Item) -> object:
        if item.span is INVALID_SPAN:
            return None  # tracing off: nothing to nest in, and no context to attach
        return tracing.activate(item.span)

    def record_exit(self, token: object) -> None:
        if token is not None:
            tracing.deactivate(token)

    # -- handler calls ---------------------------------------------------------------------

    def batch_enter(self, items: Sequence[Item]) -> object:
        span = tracing.batch_span(
            f"{self.stage} batch",
            first=items[0].span,
            others=[item.span for item in items[1:]],
            attributes=self._batch_attributes(items),
        )
        return _BatchToken(span, tracing.activate(span))

    def batch_exit(self, token: object) -> None:
        assert isinstance(token, _BatchToken)
        tracing.deactivate(token.activated)
        tracing.end_span(token.span)

    def handler_start(self, items: Sequence[Item]) -> object:
        self.metrics.in_flight.set(len(items))
        return time.perf_counter()

    def handler_finish(self, token: object, items: Sequence[Item]) -> None:
        assert isinstance(token, float)
        self.metrics.handler.observe(time.perf_counter() - token)
        self.metrics.batch.observe(len(items))
        self.metrics.in_flight.set(0)

    # -- per batch ---------------------------------------------------------------------------

    def batch_finish(self, result: BatchResult) -> None:
        for topic, n in result.consumed.items():  # one increment per topic and batch
            self.metrics.consumed(topic).inc(n)
        for outcome in result.outcomes:
            if outcome.failure is None:
                continue
            if outcome.rung:
                self.metrics.retried(outcome.rung)
            else:
                self.metrics.dead_lettered(outcome.failure.reason)

    def delivered(self, outputs: Sequence[OutRecord]) -> None:
        counts: dict[str, int] = {}
        for record in outputs:
            counts[record.topic] = counts.get(record.topic, 0) + 1
        for topic, n in counts.items():
            self.metrics.emitted(topic).inc(n)

    # -- details ---------------------------------------------------------------------------

    def _span_attributes(
        self, msg: Message, hmap: Mapping[str, str], event: Event | None
    ) -> dict[str, Any]:
        # A structured-mode (JSON) event has its attributes in the body, not in ce_* headers.
        event_id = event.id if event is not None else hmap.get("ce_id", "")
        event_type = event.type if event is not None else hmap.get("ce_type", "")
        subject = event.subject if event is not None else hmap.get("ce_subject")
        raw = msg.key()
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
        attributes = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": msg.topic(),
            "messaging.destination.partition.id": str(msg.partition()),
            "messaging.kafka.offset": msg.offset(),
            "messaging.message.id": event_id,
            "cloudevents.event_id": event_id,
            "cloudevents.event_type": event_type,
            "conveyor.stage": self.stage,
            "conveyor.task_id": subject or key,
            **self._client,
        }
        if key:
            attributes["messaging.kafka.message.key"] = key
        ext = event.extensions if event is not None else {}
        variant = ext.get(VARIANT) or hmap.get("ce_" + VARIANT)
        if variant:  # the model variant serving the task (docs/variants.md)
            attributes["conveyor.variant"] = variant
            attributes["conveyor.shadow"] = bool(ext.get(SHADOW) or hmap.get("ce_" + SHADOW))
        return attributes

    def _batch_attributes(self, items: Sequence[Item]) -> dict[str, Any]:
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.batch.message_count": len(items),
            "messaging.consumer.group.name": self.group,
            "conveyor.stage": self.stage,
            "conveyor.batch.size": len(items),
        }

    def _observe_e2e(self, item: Item, now_s: float) -> None:
        event = item.event
        data = event.head if event is not None else None  # submitted_at is in the head
        task = data.get("task") if isinstance(data, dict) else None
        submitted = task.get("submitted_at") if isinstance(task, dict) else None
        if submitted is None and event is not None and event.type == SUBMITTED:
            submitted = event.time  # the ingress event: the time it was submitted
        if isinstance(submitted, str):
            start = self._submitted_s(submitted)
            if start is not None:
                self.metrics.e2e.observe(now_s - start)

    def _submitted_s(self, submitted: str) -> float | None:
        """`submitted` in epoch seconds; the last one is kept (a batch of one task's events,
        or of a burst submitted together, parses it once)."""
        last = self._last_submitted
        if last[0] == submitted:
            return last[1]
        try:
            start = datetime.fromisoformat(submitted)
        except ValueError:
            return None
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        self._last_submitted = (submitted, start.timestamp())
        return self._last_submitted[1]

    def _log_outcome(self, outcome: RecordOutcome) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        item, failure = outcome.item, outcome.failure
        trace_id = tracing.trace_id_hex(item.span) or _trace_of(item.hmap)
        if failure is None:
            log.info(
                "event handled stage=%s task_id=%s trace_id=%s outcome=%s emitted=%d",
                self.stage,
                item.task_id,
                trace_id,
                outcome.name,
                len(outcome.records),
            )
        else:
            log.info(
                "event failed stage=%s task_id=%s trace_id=%s outcome=%s error_class=%s error=%s",
                self.stage,
                item.task_id,
                trace_id,
                outcome.name,
                failure.error_class,
                failure.message[:200],
            )


def _failure_attributes(outcome: RecordOutcome) -> dict[str, Any]:
    """Where a failed record went: retry rung n or the dead-letter topic."""
    assert outcome.failure is not None
    out: dict[str, Any] = {
        "conveyor.outcome": outcome.name,
        "error.type": outcome.failure.error_class,
    }
    if outcome.records:  # the retry or dead-letter record comes first
        out["conveyor.failure.destination"] = outcome.records[0].topic
    if outcome.rung:
        out["conveyor.retry.rung"] = outcome.rung
    return out


@dataclass(frozen=True, slots=True)
class _BatchToken:
    span: Span
    activated: object


def _parent(hmap: Mapping[str, str], event: Event | None) -> Span | None:
    if "traceparent" in hmap or "ce_traceparent" in hmap or event is None:
        return tracing.remote_parent(hmap)
    start = event.ext("traceparent")
    return tracing.remote_span(start, event.ext("tracestate") or None) if start else None


def _trace_of(hmap: Mapping[str, str]) -> str | None:
    return trace_id_of(hmap.get("traceparent") or hmap.get("ce_traceparent"))
