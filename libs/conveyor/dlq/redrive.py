"""Redrive: send dead letters back to their stage's input once the cause is fixed.

Each matching dead letter goes to `conveyor_original_topic` (the stage input; a record that
failed on a retry rung still names the input it first came from), same key (= task id), the
ORIGINAL value bytes, and the original CloudEvent headers minus `conveyor_error_*`,
`conveyor_original_*` and the retry state, so it gets a fresh retry budget and keeps its task id
and `ce_subject` (`records.redrive_headers`). It carries `conveyor_redriven_from`
(`<dlq topic>:<partition>:<offset>`) and the CloudEvents `rerun` attribute (`redrive <ref>`,
`records.mark_rerun`; in structured mode a member of the JSON body): a redrive is an explicit
operator re-run, the one thing that may replace the task's terminal status, and the task's
timeline names it.

Tracing: each redrive is a new root span (a new trace) with an OTel Link to the record's
original trace context; the record carries the new span's `traceparent` (and, in binary mode,
`ce_traceparent`), so the redriven run is its own trace that links back to the failed one
(architecture: "a redrive links to the original trace"). Without an SDK the ids are minted here,
so the new trace id still differs from the original.

Reading and remembering: the DLQs are read with an assigned consumer (no group) up to the high
watermarks seen at start. No record is redriven twice: each redriven record and its entry in
the redrive ledger (`ledger.py`) are produced in ONE Kafka transaction, and a later redrive
skips every ledger entry, whatever its filters. The transactional id is fixed per deployment
(`<prefix>conveyor.dlq-redrive`), so a second concurrent redrive fences the first; the ledger
is read after that fencing, so it sees every entry the fenced one committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind

from conveyor.dlq.ledger import ensure_ledger, ledger_entry, ledger_topic
from conveyor.dlq.reader import open_reader
from conveyor.dlq.records import (
    DeadLetter,
    DeadLetterFilter,
    Headers,
    mark_rerun,
    redrive_headers,
)
from conveyor.dlq.scan import scan
from conveyor.errors import BrokerError
from conveyor.kafka.config import common
from conveyor.kafka.producer import Acks, KafkaProducer, TransactionAborted
from conveyor.settings import KafkaSettings
from conveyor.telemetry import tracing

log = logging.getLogger(__name__)
# Commit the transaction at least this often, so a long redrive shows progress downstream.
CHUNK_MAX = 100
# Broker acks for one transaction.
TXN_TIMEOUT_S = 30.0


@dataclass(slots=True)
class RedriveReport:
    matched: int = 0
    redriven: list[str] = field(default_factory=list)  # refs (or, for a dry run, planned)
    already_redriven: int = 0
    unroutable: int = 0  # no conveyor_original_topic header: nowhere to send it


@dataclass(frozen=True, slots=True)
class Redriven:
    """One record on its way back: where it goes and the trace context it starts."""

    letter: DeadLetter
    topic: str
    headers: Headers
    traceparent: str | None
    value: bytes = b""  # what is sent: the original bytes, marked as a re-run (`mark_rerun`)


OnRecord = Callable[[Redriven], None]


class Pacer:
    """At most `rate` records per second: the i-th record waits until start + i / rate."""

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.count = 0
        self.start = 0.0

    def wait(self) -> None:
        if not self.rate:
            return
        if self.count == 0:
            self.start = self.clock()
        delay = self.start + self.count / self.rate - self.clock()
        if delay > 0:
            self.sleep(delay)  # rate limiting, not synchronisation
        self.count += 1


def redrive(
    settings: KafkaSettings,
    flt: DeadLetterFilter,
    *,
    dry_run: bool = False,
    rate: float | None = None,
    tracer: trace.Tracer | None = None,
    on_record: OnRecord | None = None,
) -> RedriveReport:
    """Redrive every matching dead letter not redriven before; see the module docstring."""
    producer = None if dry_run else _producer(settings)
    with open_reader(settings) as consumer:
        found = scan(consumer, settings, flt)
    report = RedriveReport(matched=len(found.letters))
    todo = []
    for dl in found.letters:
        if dl.ref in found.redriven:
            report.already_redriven += 1
        elif not dl.original_topic:
            report.unroutable += 1
            log.warning("dead letter has no original topic ref=%s", dl.ref)
        else:
            todo.append(dl)
    if producer is None:
        for dl in todo:
            report.redriven.append(dl.ref)
            if on_record:
                on_record(Redriven(dl, dl.original_topic, [], None))
        return report
    ensure_ledger(settings)
    pacer = Pacer(rate)
    chunk = max(1, min(CHUNK_MAX, int(rate))) if rate else CHUNK_MAX
    for part in _chunks(todo, chunk):
        _send(producer, settings, part, pacer, tracer or tracing.tracer(), on_record)
        report.redriven += [dl.ref for dl in part]
    return report


def _producer(settings: KafkaSettings) -> KafkaProducer:
    producer = KafkaProducer.open(
        {
            **common(settings),
            "client.id": "conveyor-dlq-redrive",
            # One id per deployment: a concurrent redrive fences this one (see module docstring).
            "transactional.id": f"{settings.topic_prefix}conveyor.dlq-redrive",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            # A dead letter was accepted by the broker once; let the broker judge its size again.
            "message.max.bytes": 2_097_152,
        },
        delivery_timeout_s=TXN_TIMEOUT_S,
    )
    producer.init_transactions()
    return producer


def _chunks(items: list[DeadLetter], size: int) -> Iterator[list[DeadLetter]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _send(
    producer: KafkaProducer,
    settings: KafkaSettings,
    part: list[DeadLetter],
    pacer: Pacer,
    tracer: trace.Tracer,
    on_record: OnRecord | None,
) -> None:
    ledger = ledger_topic(settings)
    done: list[Redriven] = []
    acks = Acks()  # commit_transaction waits for them all
    try:
        producer.begin()
        for dl in part:
            pacer.wait()
            record = _prepare(dl, tracer)
            headers: Any = record.headers  # stubs want str | bytes | None values
            producer.send(record.topic, record.value, dl.key, headers, acks=acks)
            entry = ledger_entry(
                dl.ref, target=record.topic, task_id=dl.task_id, traceparent=record.traceparent
            )
            producer.send(ledger, entry, dl.ref.encode(), acks=acks)
            producer.poll(0)
            done.append(record)
        producer.commit()
    except TransactionAborted as exc:  # already aborted by the producer
        raise BrokerError(f"redrive transaction failed: {exc}") from exc
    except BrokerError as exc:
        _abort(producer)
        raise BrokerError(f"redrive transaction failed: {exc}") from exc
    for record in done:
        log.info(
            "dead letter redriven ref=%s topic=%s task_id=%s traceparent=%s",
            record.letter.ref,
            record.topic,
            record.letter.task_id,
            record.traceparent,
        )
        if on_record:
            on_record(record)


def _abort(producer: KafkaProducer) -> None:
    try:
        producer.abort()
    except BrokerError as exc:  # fenced or fatal: nothing was committed either way
        log.warning("redrive abort failed error=%s", exc)


def _prepare(dl: DeadLetter, tracer: trace.Tracer) -> Redriven:
    linked = next(iter(dl.traceparents()), None)
    span = _start_span(tracer, dl, linked)
    trace_headers = tracing.inject(span) if span.get_span_context().is_valid else []
    if not trace_headers:
        # No SDK: mint the ids, so the redriven run is still a trace of its own.
        trace_headers = [("traceparent", tracing.new_traceparent().encode())]
    headers = redrive_headers(dl.headers, ref=dl.ref, trace=trace_headers, linked=linked)
    headers, value = mark_rerun(headers, dl.value, f"redrive {dl.ref}")
    tracing.end_span(span)
    started = dict(trace_headers)["traceparent"].decode()
    return Redriven(dl, dl.original_topic, headers, started, value)


def _start_span(tracer: trace.Tracer, dl: DeadLetter, linked: str | None) -> Span:
    links = []
    if linked:
        ctx = trace.get_current_span(tracing.parent_context({"traceparent": linked}))
        if ctx.get_span_context().is_valid:
            links.append(Link(ctx.get_span_context(), {"conveyor.link": "redriven_from"}))
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "send",
        "messaging.destination.name": dl.original_topic,
        "conveyor.task_id": dl.task_id,
        "conveyor.stage": dl.stage,
        "conveyor.redriven_from": dl.ref,
        "conveyor.error_class": dl.error_class,
    }
    try:
        # An empty Context: a new root (new trace), linked to, not a child of, the original.
        return tracer.start_span(
            f"redrive {dl.original_topic}",
            context=Context(),
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            links=links,
        )
    except Exception:  # telemetry never fails the operation
        log.exception("redrive span failed ref=%s", dl.ref)
        return trace.INVALID_SPAN
