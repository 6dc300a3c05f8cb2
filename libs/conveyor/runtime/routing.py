"""From a record's outcome to the records the stage produces: outputs, retries, dead letters.

Pure functions of their inputs (no Kafka client here), so every routing rule has a unit test.
A record that succeeds yields its output events; one that fails climbs the retry ladder or goes
to the dead-letter topic with a `failed` status event. Outputs that cannot be encoded, or are
larger than the configured limit, fail their input permanently: they are never sent half-made.

A task's identity is the task id in the data (`task.task_id`, or `task_id` of ingress and status
data), whatever the record key and `subject` were: every output's key, subject and event id
derive from it, so two keyless, subject-less ingress events stay two tasks. A record that did
not decode names its task by its record key alone: its status event says `rejected_record`, and
writeback only notes it on an existing task. The `rerun` extension (an operator redrive or
replay of the task) travels on to every output and enters their ids (a re-run is a new run, so
its events are not taken for the first run's duplicates); on the ingress topic, which upstream
clients write, it counts only on a record that also carries the redrive/replay header.
A shadow copy of a task (extension `shadow`, docs/variants.md) is a run of its own too: its
variant enters its ids, so its events never pass for the task's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry.trace import Span

from conveyor.errors import PermanentError
from conveyor.events.avro import SchemaSet
from conveyor.events.catalog import Catalog
from conveyor.events.codec import binary_headers
from conveyor.events.model import (
    AVRO,
    FIRSTFAILEDAT,
    RERUN,
    RETRY_STATE,
    TENANT,
    TRACEPARENT,
    Event,
    event_id,
)
from conveyor.events.status import StatusData
from conveyor.runtime.deadletter import (
    ORIGINAL_TOPIC,
    REDRIVEN_FROM,
    REPLAYED_FROM,
    Failure,
    dead_letter_headers,
    origin_headers,
)
from conveyor.runtime.handler import Emit, status_emit
from conveyor.runtime.ladder import RetryPolicy, retry_headers
from conveyor.settings import StageSettings
from conveyor.store.base import TaskStatus
from conveyor.telemetry import tracing
from conveyor.variants import SHADOW, VARIANT

# An upper bound of the CloudEvents and tracing headers of one record (a dozen short strings).
_HEADER_ALLOWANCE = 16_384
# Topics a stage emits to (outputs, lanes, status): a dozen; a handler naming topics at random
# must not grow the cache without bound.
_TOPIC_CACHE_LIMIT = 256


class OutRecord(NamedTuple):
    """One record to produce. A named tuple, not a frozen dataclass: as immutable, and made
    ~2x faster (one or more per consumed record: 0.5-1 µs a hop)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(slots=True)
class Item:
    """One consumed record on its way through the stage."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    hmap: dict[str, str]
    span: Span
    event: Event | None = None

    @property
    def task_id(self) -> str | None:
        """The data's task id, else the subject, else (an undecoded record) the record key."""
        if self.event is not None:
            # The head: the task id without decoding the data a handler may not have read.
            named = task_id_of(self.event.head) or self.event.subject
            if named:
                return named
        return self.key.decode("utf-8", "replace") if self.key else None

    @property
    def attempt(self) -> int:
        raw = self.hmap.get("ce_attempt", "")
        return int(raw) if raw.isdigit() else 0


class Router:
    """Builds the records a stage produces for each consumed item."""

    def __init__(
        self, stage: str, settings: StageSettings, catalog: Catalog, schemas: SchemaSet
    ) -> None:
        self.stage = stage
        self.settings = settings
        self.catalog = catalog
        self.schemas = schemas
        self.policy = RetryPolicy(tuple(settings.retry_delays))
        self.source = f"/conveyor/{stage}"
        self.dlq_topic = settings.topic(catalog.dlq_topic(stage))
        self._specs = {spec.type: spec for spec in catalog.events}
        self._urns = {spec.type: spec.dataschema for spec in catalog.events}
        self._topic_names: dict[str, str] = {}
        self._ingress = frozenset(
            settings.topic(t) for spec in catalog.events if spec.ingress for t in spec.topics
        )

    def outputs(self, item: Item, emits: Sequence[Emit], now: str) -> list[OutRecord]:
        """Encode the handler's emits; raise PermanentError if one can't be sent."""
        assert item.event is not None
        return [self._output(item, item.event, emit, now) for emit in emits]

    def _output(self, item: Item, source: Event, emit: Emit, now: str) -> OutRecord:
        spec = self._specs.get(emit.type)
        if spec is None:
            raise PermanentError(f"stage {self.stage} emitted unknown event type {emit.type}")
        task_id = task_id_of(emit.data) or item.task_id or ""
        ext = {k: v for k, v in source.extensions.items() if k not in RETRY_STATE}
        discriminator = emit.discriminator
        if RERUN in ext:
            if self._from_ingress(item) and not _operator_sent(item.hmap):
                del ext[RERUN]  # an upstream client cannot claim an operator's override
            else:  # a re-run is a new run: new ids, the same on its own redelivery
                discriminator = f"{discriminator}\x1e{ext[RERUN]}"
        if TRACEPARENT not in ext:
            start = tracing.traceparent_of(item.span) or item.hmap.get("traceparent")
            if start:
                ext[TRACEPARENT] = start  # this hop starts the task's trace
        ext.update(emit.extensions)
        if ext.get(SHADOW):  # a shadow copy is a run of its own: ids apart from the primary's
            discriminator = f"{discriminator}\x1eshadow.{ext.get(VARIANT, '')}"
        value = self.schemas.encode(spec.schema, spec.version, emit.data)  # SchemaError
        headers = binary_headers(
            event_id(task_id, emit.type, discriminator, tenant=ext.get(TENANT) or ""),
            self.source,
            emit.type,
            AVRO,
            subject=task_id,
            time=now,
            dataschema=self._urns[spec.type],
            extensions=ext,
        )
        topic = self._topic(emit.topic or spec.topics[0])
        if item.span.is_recording():
            # The next hop's span is a child of this record's PRODUCER span, itself a child of
            # the consume span: one per emitted record, made only for sampled records.
            sent = tracing.producer_span(item.span, topic)
            headers += tracing.inject(sent if sent.get_span_context().is_valid else item.span)
        else:
            # No span of ours (SDK off, or the parent was sampled out): hand on the incoming
            # context as it is; a sampled-out root hands on its own (unsampled) context.
            carried = tracing.carried(item.hmap, source.extensions)
            if carried or not item.span.get_span_context().is_valid:
                headers += carried
            else:
                headers += tracing.inject(item.span)
        record = OutRecord(topic, task_id.encode(), value, headers)
        self._check_size(record)
        return record

    def _topic(self, name: str) -> str:
        """The deployment's name of catalog topic `name` (prefixed), made once per topic."""
        topic = self._topic_names.get(name)
        if topic is None:
            topic = self.settings.topic(name)
            if len(self._topic_names) < _TOPIC_CACHE_LIMIT:
                self._topic_names[name] = topic
        return topic

    def _from_ingress(self, item: Item) -> bool:
        # A record on a retry rung came from the topic its origin header names.
        return item.topic in self._ingress or item.hmap.get(ORIGINAL_TOPIC) in self._ingress

    def _check_size(self, record: OutRecord) -> None:
        size = len(record.value)
        if size + _HEADER_ALLOWANCE <= self.settings.max_record_bytes:
            return  # headers are small: only count them when the value is near the limit
        size += sum(len(k) + len(v) for k, v in record.headers)
        if size > self.settings.max_record_bytes:
            raise PermanentError(
                f"output for {record.topic} is {size} bytes, over the "
                f"{self.settings.max_record_bytes}-byte limit"
            )

    def failure(self, item: Item, failure: Failure, now: str) -> tuple[list[OutRecord], int]:
        """Retry or dead-letter records for a failed item; returns them and the rung (0 = DLQ)."""
        attempt = item.attempt + 1
        rung = None if failure.permanent else self.policy.next_rung(attempt)
        headers = origin_headers(item.headers, item.topic, item.partition, item.offset)
        if rung is not None:
            first = item.hmap.get("ce_" + FIRSTFAILEDAT) or now
            retried = retry_headers(
                headers,
                attempt=attempt,
                first_failed_at=first,
                error=f"{failure.error_class}: {failure.message}",
            )
            topic = self.settings.topic(self.catalog.retry_topic(self.stage, rung))
            out = [OutRecord(topic, item.key, item.value, retried)]
            out += self._status(item, TaskStatus.RETRYING, failure, attempt, now, f"retry.{rung}")
            return out, rung
        dead = dead_letter_headers(headers, failure, stage=self.stage, attempts=attempt, now=now)
        out = [OutRecord(self.dlq_topic, item.key, item.value, dead)]
        where = f"failed.{item.topic}.{item.partition}.{item.offset}"
        out += self._status(item, TaskStatus.FAILED, failure, attempt, now, where)
        return out, 0

    def _status(
        self, item: Item, status: TaskStatus, failure: Failure, attempt: int, now: str, where: str
    ) -> list[OutRecord]:
        task_id = item.task_id
        if not task_id:
            return []  # no task id in the data, no subject, no key: nothing to attach it to
        data = _task_fields(_data_of(item.event))
        # An undecodable record still names its tenant (and trace) in its ce_* headers.
        source = item.event or Event(
            id="",
            type="",
            source="",
            subject=task_id,
            data=None,
            extensions={k[3:]: v for k, v in item.hmap.items() if k in _CARRIED},
        )
        ext = source.extensions
        report = StatusData(
            task_id=task_id,
            tenant=ext.get("tenant") or data.get("tenant") or "",
            status=status,
            stage=self.stage,
            time=now,
            reason=f"{failure.error_class}: {failure.message}",
            error_class=failure.error_class,
            attempt=attempt,
            callback_url=data.get("callback_url"),
            kind=data.get("kind"),
            # Undecoded: the record key is all that names the task, which proves nothing.
            rejected_record=item.event is None,
        )
        emit = status_emit(report, discriminator=f"{self.stage}.{where}")
        return [self._output(item, source, emit, now)]


_CARRIED = frozenset(("ce_tenant", "ce_priority", "ce_deadline", "ce_traceparent", "ce_tracestate"))


def _task_fields(data: Any) -> Mapping[str, Any]:
    """tenant / callback_url / kind from ingress data (flat) or internal data (`task`)."""
    if not isinstance(data, Mapping):
        return {}
    task = data.get("task")
    fields = task if isinstance(task, Mapping) else data
    out = {}
    for key in ("tenant", "callback_url", "kind"):
        value = fields.get(key)
        out[key] = value if isinstance(value, str) else None
    return out


def _data_of(event: Event | None) -> Any:
    """The event's data, None when it does not decode (the record then fails with that)."""
    if event is None:
        return None
    try:
        return event.data
    except PermanentError:
        return event.head


def task_id_of(data: Any) -> str | None:
    """The task id an event's data names: `task.task_id` (internal) or `task_id` (ingress,
    status); None when the data names none."""
    if not isinstance(data, Mapping):
        return None
    task = data.get("task")
    value = (task if isinstance(task, Mapping) else data).get("task_id")
    return value if isinstance(value, str) and value else None


def _operator_sent(hmap: Mapping[str, str]) -> bool:
    return REDRIVEN_FROM in hmap or REPLAYED_FROM in hmap
