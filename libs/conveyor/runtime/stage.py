"""The stage loop: poll a batch → decode → handle → produce → wait for acks → commit.

One synchronous confluent-kafka loop per process. In-flight work is bounded by the poll batch
(`batch_max`) and librdkafka's prefetch by `queued.max.messages.kbytes`; the loop takes no new
records while a batch is being handled, which is the stage's backpressure.

The order is the guarantee: a batch's offsets are committed only after every record it produced
(outputs, retries, dead letters, status events) was acknowledged by the broker. A crash between
produce and commit redelivers the batch (at-least-once); deterministic event ids let consumers
deduplicate. With `exactly_once`, produce and offsets go in one Kafka transaction instead.

Retry rungs are consumed by the same consumer: a record not yet due pauses only its partition,
seeks back to it, and a timer in the loop resumes it when due; the main input keeps flowing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from opentelemetry.trace import INVALID_SPAN, Span

from conveyor.errors import BrokerError, PermanentError
from conveyor.events.avro import SchemaError, default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import DecodeError, decode_ingress, decode_mapped, header_map
from conveyor.events.model import AVRO
from conveyor.kafka import config
from conveyor.runtime.deadletter import Failure
from conveyor.runtime.handler import BatchOutcome, Emit, StageContext, StageService
from conveyor.runtime.ladder import rung_of
from conveyor.runtime.lanes import LaneScheduler
from conveyor.runtime.routing import Item, OutRecord, Router
from conveyor.settings import StageSettings
from conveyor.telemetry import tracing
from conveyor.telemetry.metrics import StageMetrics

log = logging.getLogger(__name__)
TP = tuple[str, int]
# How often consumer lag is refreshed: one committed-offsets request per interval.
LAG_INTERVAL_S = 10.0


class StageRunner:
    def __init__(self, service: StageService[Any], settings: StageSettings) -> None:
        self.service = service
        self.settings = settings
        self.stage = service.name
        self.catalog = load_catalog()
        self.schemas = default_schemas()
        self.router = Router(self.stage, settings, self.catalog, self.schemas)
        # A stage that accepts only some of the types routed to it subscribes only to theirs.
        specs = tuple(
            s
            for s in self.catalog.consumed_by(self.stage)
            if not service.accepts or s.type in service.accepts
        )
        self.accepts = frozenset(service.accepts or [s.type for s in specs])
        self.ingress_topics = frozenset(
            settings.topic(t) for s in specs if s.ingress for t in s.topics
        )
        self.input_topics = [settings.topic(t) for s in specs for t in s.topics]
        # A type published on several topics has priority lanes, in catalog order.
        self.lanes = [settings.topic(t) for s in specs if len(s.topics) > 1 for t in s.topics]
        # Each input topic carries one event type (the catalog's); anything else is misrouted.
        self.topic_types = {settings.topic(t): s.type for s in specs for t in s.topics}
        self.retry_topics = [
            settings.topic(self.catalog.retry_topic(self.stage, n))
            for n in range(1, self.router.policy.rungs + 1)
        ]
        self.metrics = StageMetrics(self.stage)
        self.ctx: StageContext[Any] = StageContext(
            self.stage, settings, logging.getLogger(f"conveyor.stage.{self.stage}")
        )
        self.instance = (
            os.environ.get("CONVEYOR_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"
        )
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()
        self.failed: str | None = None
        self.started = False
        self._paused: dict[TP, int] = {}  # partition -> due time (ms) of its head record
        self._revoked: set[TP] = set()  # partitions revoked during the current poll
        self._lanes: LaneScheduler | None = None
        self._delivery_errors: list[KafkaError] = []
        self._last_lag = 0.0
        self._crash_after = _failpoint_count(os.environ.get("CONVEYOR_FAILPOINT", ""))
        self.consumer: Consumer | None = None
        self.producer: Producer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.service.setup is not None:
            self.ctx.resources.update(self.service.setup(self.settings))
        client_id = f"conveyor-{self.stage}-{self.instance}"
        # A restarted instance reuses its slot's transactional.id, so init_transactions fences
        # the crashed one's open transaction at once (read_committed readers would otherwise
        # stall on it until transaction.timeout.ms).
        slot = self.settings.instance_slot or self.instance
        txn_id = f"{self.settings.group}.{slot}" if self.settings.exactly_once else None
        self.producer = Producer(
            config.producer(self.settings, client_id=client_id, transactional_id=txn_id)
        )
        if txn_id:
            self.producer.init_transactions(self.settings.delivery_timeout_s)
        self.consumer = Consumer(config.consumer(self.settings, client_id=client_id))
        self.consumer.subscribe(
            self.input_topics + self.retry_topics,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        if self.settings.priority_lanes and self.lanes:
            self._lanes = LaneScheduler(self.consumer, self.lanes, self.settings.lane_starvation_s)
        self.heartbeat = time.monotonic()
        self.started = True
        log.info(
            "stage started stage=%s group=%s topics=%s exactly_once=%s",
            self.stage,
            self.settings.group,
            len(self.input_topics + self.retry_topics),
            self.settings.exactly_once,
        )

    def run(self) -> None:
        """Run until `stop()`; raise BrokerError if Kafka fails (the process must restart)."""
        if not self.started:
            self.start()
        try:
            while not self.stopping.is_set():
                self.heartbeat = time.monotonic()
                self._resume_due()
                if self._lanes is not None:
                    self._lanes.before_poll(time.monotonic(), set(self._paused))
                batch = self._poll()
                if batch:
                    self._process(batch)
                self._refresh_lag()
        except BaseException as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._close()

    def stop(self) -> None:
        self.stopping.set()

    def healthy(self) -> bool:
        """Liveness: not failed, and the loop is turning (setup, e.g. model loading, counts)."""
        if self.failed is not None:
            return False
        return not self.started or time.monotonic() - self.heartbeat <= self.settings.health_stall_s

    def ready(self) -> bool:
        """Readiness: set up, subscribed and healthy."""
        return self.started and self.healthy()

    def _close(self) -> None:
        # Graceful stop: the last batch is already emitted and committed; leave the group so
        # the partitions move at once, then release the handler's resources.
        try:
            if self.producer is not None:
                self.producer.flush(self.settings.delivery_timeout_s)
            if self.consumer is not None:
                self.consumer.close()
        except KafkaException as exc:
            log.warning("close failed stage=%s error=%s", self.stage, exc)
        if self.service.teardown is not None:
            self.service.teardown(self.ctx.resources)
        log.info("stage stopped stage=%s", self.stage)

    # -- polling ---------------------------------------------------------------------------

    def _poll(self) -> list[Message]:
        assert self.consumer is not None
        s = self.settings
        self._revoked.clear()
        # consume(n, t) blocks until n records or t: drain what is queued without waiting,
        # and block only for the first record of an idle stage.
        batch = self.consumer.consume(s.batch_max, 0)
        if not batch:
            batch = self.consumer.consume(1, s.poll_timeout_ms / 1000)
        if batch and len(batch) < s.batch_max:
            # Dynamic batching: after the first record, wait up to batch_wait_ms for more.
            batch += self.consumer.consume(s.batch_max - len(batch), s.batch_wait_ms / 1000)
        return batch

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The loop is synchronous: by the time a revoke is served inside consume(), every
        # earlier batch was produced, acknowledged and committed. Records of these partitions
        # that an earlier consume() of this poll returned are dropped (`_revoked`): their new
        # owner reads them from the committed offset. librdkafka keeps a partition's pause
        # across revoke and re-assign, so a paused rung is resumed here, else it would come
        # back paused with no timer to resume it, and stall for good.
        paused = [tp for tp in partitions if (tp.topic, tp.partition) in self._paused]
        if self._lanes is not None:
            paused += self._lanes.on_revoke(partitions)
        for tp in partitions:
            self._paused.pop((tp.topic, tp.partition), None)
            self._revoked.add((tp.topic, tp.partition))
        self.metrics.paused.set(len(self._paused))
        if paused:
            try:
                consumer.resume(paused)
            except KafkaException as exc:
                log.warning("resume on revoke failed stage=%s error=%s", self.stage, exc)

    def _resume_due(self) -> None:
        if not self._paused:
            return
        now = int(time.time() * 1000)
        due = [tp for tp, at in self._paused.items() if at <= now]
        if due:
            assert self.consumer is not None
            self.consumer.resume([TopicPartition(t, p) for t, p in due])
            for tp in due:
                del self._paused[tp]
            self.metrics.paused.set(len(self._paused))

    def _pause(self, msg: Message, due_ms: int) -> None:
        assert self.consumer is not None
        topic, partition, offset = _where(msg)
        tp = TopicPartition(topic, partition, offset)
        self.consumer.pause([tp])
        self.consumer.seek(tp)  # fetch this record again once resumed
        self._paused[(topic, partition)] = due_ms
        self.metrics.paused.set(len(self._paused))

    # -- one batch -------------------------------------------------------------------------

    def _process(self, batch: list[Message]) -> None:
        now_ms = int(time.time() * 1000)
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        commits: dict[TP, int] = {}
        starts: dict[TP, int] = {}
        items: list[Item] = []
        out: list[OutRecord] = []
        consumed: dict[str, int] = {}
        for msg in batch:
            err = msg.error()
            if err is not None:
                self._on_consume_error(err)
                continue
            topic, partition, offset = _where(msg)
            tp = (topic, partition)
            if tp in self._paused or tp in self._revoked:
                continue  # fetched before the pause / revoke took effect; it will come again
            rung = rung_of(tp[0]) if tp[0] in self.retry_topics else 0
            if rung:
                due = self.router.policy.due_ms(rung, msg.timestamp()[1])
                if due > now_ms:
                    self._pause(msg, due)
                    continue
            starts.setdefault(tp, offset)
            commits[tp] = offset + 1
            consumed[tp[0]] = consumed.get(tp[0], 0) + 1
            item = self._admit(msg, out, now)
            if item is not None:
                items.append(item)
        for topic, n in consumed.items():  # one increment per topic and batch, not per record
            self.metrics.consumed(topic).inc(n)
        self.metrics.in_flight.set(len(items))
        if items:
            self._handle(items, out, now)
        if commits or out:
            self._deliver(out, commits, starts)
        self.metrics.in_flight.set(0)

    def _admit(self, msg: Message, out: list[OutRecord], now: str) -> Item | None:
        """Decode and check a record; a bad one is dead-lettered here and None returned."""
        topic, partition, offset = _where(msg)
        value = msg.value() or b""
        headers = cast(list[tuple[str, bytes]], list(msg.headers() or ()))
        hmap: dict[str, str] = {}
        event = None
        error: PermanentError | None = None
        try:
            hmap = header_map(headers)
            if len(value) > self.settings.max_record_bytes:
                raise PermanentError(
                    f"record is {len(value)} bytes, over the "
                    f"{self.settings.max_record_bytes}-byte limit"
                )
            if topic in self.ingress_topics:  # also plain JSON tasks (docs/ingress.md)
                at = f"{topic}:{partition}:{offset}"
                event = decode_ingress(hmap, value, self.schemas, at=at)
            else:
                event = decode_mapped(hmap, value, self.schemas)
            if event.type not in self.accepts:
                raise PermanentError(f"stage {self.stage} does not accept {event.type}")
            expected = self.topic_types.get(topic)
            if expected is not None and event.type != expected:
                raise PermanentError(f"{event.type} does not belong on {topic}")
            if event.datacontenttype != AVRO and topic not in self.ingress_topics:
                raise DecodeError(f"internal events must be Avro, got {event.datacontenttype}")
            self._check_schema(event)
        except PermanentError as exc:
            error = exc
        # The span starts after decoding: a structured-mode event carries its trace context in
        # the JSON body, not in headers. Without the SDK there is no span to make: the router
        # carries the incoming context to the next hop as it is (tracing.carried). Under a
        # parent-based sampler a record whose parent was not sampled gets no span either, only
        # its parent's context, so unsampled records stay cheap and still propagate.
        span: Span = INVALID_SPAN
        if tracing.enabled():
            span = tracing.record_span(
                f"process {topic}",
                parent=self._parent(hmap, event),
                attributes=lambda: self._span_attributes(msg, hmap, event),
            )
        item = Item(topic, partition, offset, msg.key(), value, headers, hmap, span, event)
        if error is not None:
            self._fail(item, error, out, now, permanent=True)
            return None
        return item

    def _check_schema(self, event: Any) -> None:
        """Avro data must be written with (a version of) the schema the catalog names."""
        if event.datacontenttype != AVRO:
            return
        spec = self.catalog.spec(event.type)
        parts = (event.dataschema or "").split(":")
        if spec is not None and (len(parts) != 5 or parts[3] != spec.schema):
            raise SchemaError(f"{event.type} must carry {spec.schema} data, not {event.dataschema}")

    @staticmethod
    def _parent(hmap: dict[str, str], event: Any) -> Span | None:
        if "traceparent" in hmap or "ce_traceparent" in hmap or event is None:
            return tracing.remote_parent(hmap)
        start = event.ext("traceparent")
        return tracing.remote_span(start, event.ext("tracestate") or None) if start else None

    def _handle(self, items: list[Item], out: list[OutRecord], now: str) -> None:
        events = [item.event for item in items if item.event is not None]
        started = time.perf_counter()
        outcomes = self._run_handler(items, events)
        self.metrics.handler.observe(time.perf_counter() - started)
        self.metrics.batch.observe(len(items))
        now_s = time.time()
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._fail(item, outcome, out, now, permanent=isinstance(outcome, PermanentError))
                continue
            emits = [outcome] if isinstance(outcome, Emit) else list(outcome or ())
            try:
                records = self.router.outputs(item, emits, now)
            except PermanentError as exc:
                self._fail(item, exc, out, now, permanent=True)
                continue
            out.extend(records)
            self._observe_e2e(item, now_s)
            self._log_outcome(item, "emitted", len(records))
            tracing.end_span(item.span)

    def _run_handler(self, items: list[Item], events: list[Any]) -> Sequence[BatchOutcome]:
        svc = self.service
        if svc.handle is not None:
            results: list[BatchOutcome] = []
            for item, event in zip(items, events, strict=True):
                token = tracing.activate(item.span)  # handler spans nest in the record's span
                try:
                    results.append(svc.handle(event, self.ctx))
                except Exception as exc:  # routed by the runtime: ladder or dead letter
                    results.append(exc)
                finally:
                    tracing.deactivate(token)
            return results
        assert svc.handle_batch is not None
        batch_span = tracing.batch_span(
            f"{self.stage} batch",
            first=items[0].span,
            others=[item.span for item in items[1:]],
            attributes=self._batch_attributes(items),
        )
        token = tracing.activate(batch_span)
        try:
            outcomes = list(svc.handle_batch(events, self.ctx))
            if len(outcomes) != len(events):
                raise RuntimeError(f"batch handler returned {len(outcomes)} for {len(events)}")
            return outcomes
        except Exception as exc:
            return [exc] * len(items)
        finally:
            tracing.deactivate(token)
            tracing.end_span(batch_span)

    def _fail(
        self, item: Item, exc: BaseException, out: list[OutRecord], now: str, *, permanent: bool
    ) -> None:
        failure = Failure.of(exc, permanent=permanent)
        records, rung = self.router.failure(item, failure, now)
        out.extend(records)
        if rung:
            self.metrics.retried(rung)
        else:
            self.metrics.dead_lettered(failure.reason)
        self._log_outcome(item, f"retry.{rung}" if rung else "dead-lettered", 0, failure)
        tracing.end_span(item.span, exc)

    # -- produce, acknowledge, commit --------------------------------------------------------

    def _deliver(self, out: list[OutRecord], commits: dict[TP, int], starts: dict[TP, int]) -> None:
        assert self.producer is not None and self.consumer is not None
        offsets = [TopicPartition(t, p, o) for (t, p), o in commits.items()]
        if self.settings.exactly_once:
            self._deliver_transaction(out, offsets, starts)
            return
        for record in out:
            self._produce(record)
        # Emit, wait for the broker's acknowledgement, then commit: a crash before the commit
        # redelivers the batch (at-least-once); committing first could lose it.
        remaining = self.producer.flush(self.settings.delivery_timeout_s)
        if remaining or self._delivery_errors:
            errors = self._delivery_errors[:3]
            self._delivery_errors.clear()
            raise BrokerError(f"delivery failed remaining={remaining} errors={errors}")
        self._count_emitted(out)
        self._failpoint()
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=True)

    def _deliver_transaction(
        self, out: list[OutRecord], offsets: list[TopicPartition], starts: dict[TP, int]
    ) -> None:
        assert self.producer is not None and self.consumer is not None
        timeout = self.settings.delivery_timeout_s
        try:
            self.producer.begin_transaction()
            for record in out:
                self._produce(record)
            if offsets:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), timeout
                )
            self._failpoint()  # leaves the transaction open: the broker must abort it
            self._commit_transaction(timeout)
        except KafkaException as exc:
            error = exc.args[0]
            if not error.txn_requires_abort():
                raise BrokerError(f"transaction failed: {error}") from exc
            log.warning("transaction aborted stage=%s error=%s", self.stage, error)
            self.producer.abort_transaction(timeout)
            # Rewind: the aborted batch is consumed and handled again.
            for (topic, partition), offset in starts.items():
                self.consumer.seek(TopicPartition(topic, partition, offset))
            return
        self._count_emitted(out)

    def _commit_transaction(self, timeout: float) -> None:
        assert self.producer is not None
        for _ in range(5):
            try:
                self.producer.commit_transaction(timeout)
                return
            except KafkaException as exc:
                if not exc.args[0].retriable():
                    raise
        raise BrokerError("commit_transaction kept failing with retriable errors")

    def _failpoint(self) -> None:
        # Fault injection for tests: `CONVEYOR_FAILPOINT=exit-before-commit:N` ends the process
        # after the Nth acknowledged batch and before its commit (offsets, or the transaction
        # holding them), as a crash there would.
        if self._crash_after is None:
            return
        self._crash_after -= 1
        if self._crash_after <= 0:
            assert self.producer is not None
            self.producer.flush(self.settings.delivery_timeout_s)  # in a transaction: unacked
            log.warning("failpoint exit-before-commit reached stage=%s", self.stage)
            logging.shutdown()
            os._exit(86)

    def _produce(self, record: OutRecord) -> None:
        assert self.producer is not None
        deadline = time.monotonic() + self.settings.delivery_timeout_s
        while True:
            try:
                self.producer.produce(
                    record.topic,
                    record.value,
                    record.key,
                    headers=cast(Any, record.headers),  # stubs want str | bytes | None values
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports until it drains.
                if time.monotonic() > deadline:
                    raise BrokerError("producer queue stayed full") from None
                self.producer.poll(0.05)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(err)

    def _on_consume_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise BrokerError(f"consumer failed: {err}")
        log.warning("consume error stage=%s error=%s", self.stage, err)

    # -- telemetry -------------------------------------------------------------------------

    def _count_emitted(self, out: list[OutRecord]) -> None:
        counts: dict[str, int] = {}
        for record in out:
            counts[record.topic] = counts.get(record.topic, 0) + 1
        for topic, n in counts.items():
            self.metrics.emitted(topic).inc(n)

    def _span_attributes(self, msg: Message, hmap: dict[str, str], event: Any) -> dict[str, Any]:
        # A structured-mode (JSON) event has its attributes in the body, not in ce_* headers.
        event_id = event.id if event is not None else hmap.get("ce_id", "")
        event_type = event.type if event is not None else hmap.get("ce_type", "")
        subject = event.subject if event is not None else hmap.get("ce_subject")
        key = msg.key()
        if not subject and isinstance(key, bytes):
            subject = key.decode("utf-8", "replace")
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": msg.topic(),
            "messaging.destination.partition.id": str(msg.partition()),
            "messaging.kafka.offset": msg.offset(),
            "messaging.consumer.group.name": self.settings.group,
            "messaging.message.id": event_id,
            "cloudevents.event_id": event_id,
            "cloudevents.event_type": event_type,
            "conveyor.stage": self.stage,
            "conveyor.task_id": subject or "",
        }

    def _batch_attributes(self, items: list[Item]) -> dict[str, Any]:
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.batch.message_count": len(items),
            "messaging.consumer.group.name": self.settings.group,
            "conveyor.stage": self.stage,
            "conveyor.batch.size": len(items),
        }

    def _observe_e2e(self, item: Item, now_s: float) -> None:
        data = item.event.data if item.event is not None else None
        task = data.get("task") if isinstance(data, dict) else None
        submitted = task.get("submitted_at") if isinstance(task, dict) else None
        if isinstance(submitted, str):
            try:
                start = datetime.fromisoformat(submitted)
            except ValueError:
                return
            if start.tzinfo is None:
                start = start.replace(tzinfo=UTC)
            self.metrics.e2e.observe(now_s - start.timestamp())

    def _log_outcome(
        self, item: Item, outcome: str, emitted: int, failure: Failure | None = None
    ) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        trace_id = tracing.trace_id_hex(item.span) or _trace_of(item.hmap)
        if failure is None:
            log.info(
                "event handled stage=%s task_id=%s trace_id=%s outcome=%s emitted=%d",
                self.stage,
                item.task_id,
                trace_id,
                outcome,
                emitted,
            )
        else:
            log.info(
                "event failed stage=%s task_id=%s trace_id=%s outcome=%s error_class=%s error=%s",
                self.stage,
                item.task_id,
                trace_id,
                outcome,
                failure.error_class,
                failure.message[:200],
            )

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < LAG_INTERVAL_S or self.consumer is None:
            return
        self._last_lag = now
        try:
            assigned = self.consumer.assignment()
            if not assigned:
                return
            for tp in self.consumer.committed(assigned, timeout=2.0):
                _, high = self.consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)
                committed = tp.offset if tp.offset >= 0 else 0
                self.metrics.lag(tp.topic, tp.partition, max(high - committed, 0))
        except KafkaException as exc:
            log.debug("lag refresh failed stage=%s error=%s", self.stage, exc)


def _where(msg: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (never None once it has no error)."""
    return cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset())


def _failpoint_count(spec: str) -> int | None:
    name, _, count = spec.partition(":")
    return int(count or 1) if name == "exit-before-commit" else None


def _trace_of(hmap: dict[str, str]) -> str | None:
    parent = hmap.get("traceparent") or hmap.get("ce_traceparent") or ""
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else None
