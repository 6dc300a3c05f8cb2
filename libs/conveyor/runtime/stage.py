"""The stage loop: poll → retry gate → process → deliver → commit.

One synchronous loop per process over the client layer (`conveyor.kafka`) and the pure batch
step (`conveyor.runtime.step`); telemetry is passed in as hooks (`StageTelemetry`).

The order is the guarantee (`Delivery`): a batch's offsets are committed only after every
record it produced (outputs, retries, dead letters, status events) was acknowledged by the
broker, and batches are committed in the order they were read; the loop reads on meanwhile.
With `pipelined`, the batch step runs on a worker thread (`Pipeline`).

Retry rungs are consumed by the same consumer: a record not yet due pauses only its partition
(`RetryGate`) and the loop resumes it when due; the main input keeps flowing.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from confluent_kafka import TopicPartition

from conveyor.cancel.watch import CancelWatch
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.kafka import config
from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.health import BrokerAvailability
from conveyor.kafka.producer import KafkaProducer
from conveyor.quota import QuotaSettings, TenantLimits
from conveyor.runtime.delivery import Delivery, Failpoint
from conveyor.runtime.fairfeed import FairShare, quota_refusal
from conveyor.runtime.fairshare import FairWindow, TenantMetrics
from conveyor.runtime.handler import StageContext, StageService
from conveyor.runtime.hooks import StageHooks
from conveyor.runtime.lagreport import LagReporter
from conveyor.runtime.lanes import LaneScheduler
from conveyor.runtime.pipeline import Pipeline
from conveyor.runtime.retrygate import RetryGate
from conveyor.runtime.routing import Router
from conveyor.runtime.step import BatchResult, BatchStep, now_iso
from conveyor.runtime.telemetry import StageTelemetry
from conveyor.runtime.topics import StageTopics
from conveyor.settings import StageSettings
from conveyor.telemetry import tracing

log = logging.getLogger(__name__)
# Prefetch of a stage whose lane scheduler (not fair share) orders its lanes: per partition,
# fetch again below this many queued records, at most this many bytes per fetch.
LANE_PREFETCH = {"queued.min.messages": 20, "max.partition.fetch.bytes": 16_384}
TP = tuple[str, int]
# How often consumer lag is refreshed (on its own thread): one probe round trip per interval.
LAG_INTERVAL_S = 10.0
# Pipelined: the idle poll while the worker has batches, so finished ones are delivered soon.
_BUSY_POLL_S = 0.005
# Fair share: records read per poll into the read-ahead window (the window bounds the total).
_FAIR_POLL = 500


class StageRunner:
    def __init__(
        self,
        service: StageService[Any],
        settings: StageSettings,
        *,
        hooks: StageHooks | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.stage = service.name
        catalog = load_catalog()
        self.router = Router(self.stage, settings, catalog, default_schemas())
        self.topics = StageTopics.of(self.stage, service.accepts, settings, catalog)
        self.instance = tracing.instance_id()
        self.telemetry = StageTelemetry(
            self.stage,
            settings.group,
            client_id=f"conveyor-{self.stage}-{self.instance}",
            bootstrap=settings.kafka_bootstrap,
        )
        self.metrics = self.telemetry.metrics
        self.hooks: StageHooks = hooks or self.telemetry
        self.ctx: StageContext[Any] = StageContext(
            self.stage, settings, logging.getLogger(f"conveyor.stage.{self.stage}")
        )
        self.step = BatchStep(
            service,
            self.ctx,
            self.topics,
            self.router,
            self.hooks,
            catalog=catalog,
            schemas=self.router.schemas,
            max_record_bytes=settings.max_record_bytes,
            progress=self._progress,
        )
        # Pipelined: the step runs on a worker thread while this loop keeps turning.
        self._pipeline = (
            Pipeline(self.step, settings.max_in_flight, settings.batch_max)
            if settings.pipelined
            else None
        )
        # Fair share: what runs next comes from a read-ahead window, by lane then tenant
        # (at-least-once only: a transaction commits a batch's own offsets).
        self._fair = (
            _fair_share(settings, self.topics.lanes, self._pipeline, self.step)
            if self._pipeline is not None and settings.fair_share and not settings.exactly_once
            else None
        )
        self._held: list[TP] = []  # partitions paused because the pipeline is full
        self.availability = BrokerAvailability(settings.broker_down_s)
        self.stopping = threading.Event()
        self.heartbeat = time.monotonic()  # the loop's last turn
        self.progress_at = self.heartbeat  # the handler's last record (pipelined)
        self.failed: str | None = None
        self.started = False
        self.delivery: Delivery | None = None
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self.gate: RetryGate | None = None
        self._lanes: LaneScheduler | None = None
        self._lag: LagReporter | None = None
        self.cancels: CancelWatch | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.service.setup is not None:
            self.ctx.resources.update(self.service.setup(self.settings))
        if self._fair is not None:
            self._fair.capacity = self.ctx.resources.get("capacity")  # GPU-aware, if set up
        if self.settings.cancel_watch:  # docs/cancellation.md
            # Not waited for: the stage consumes at once and the watch catches up within a
            # fetch or two; inference syncs with the topic before every model run anyway.
            self.cancels = CancelWatch(self.settings, name=self.stage)
            self.cancels.start()
            self.ctx.resources["cancels"] = self.step.cancels = self.cancels
        client_id = f"conveyor-{self.stage}-{self.instance}"
        # A restarted instance reuses its slot's transactional.id, so init_transactions fences
        # the crashed one's open transaction at once (read_committed readers would otherwise
        # stall on it until transaction.timeout.ms).
        slot = self.settings.instance_slot or self.instance
        txn_id = f"{self.settings.group}.{slot}" if self.settings.exactly_once else None
        self.producer = KafkaProducer.open(
            config.producer(self.settings, client_id=client_id, transactional_id=txn_id),
            delivery_timeout_s=self.settings.delivery_timeout_s,
            availability=self.availability,
        )
        if txn_id:
            self.producer.init_transactions()
        conf = config.consumer(self.settings, client_id=client_id)
        if self.settings.priority_lanes and self.topics.lanes and self._fair is None:
            # The lane scheduler pauses and resumes partitions, but records librdkafka has
            # already fetched are handed out first: a lower lane resumed by the starvation
            # guard waits behind every prefetched record of a higher lane (a whole 1 MiB fetch
            # of small tasks is thousands). A shallow prefetch keeps that queue short.
            for key, value in LANE_PREFETCH.items():
                conf.setdefault(key, value)
        self.consumer = KafkaConsumer.open(conf, availability=self.availability)
        self.attach(self.consumer, self.producer)
        self.consumer.subscribe(
            self.topics.subscribed, on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self._lag = LagReporter(
            _probe(conf, self.availability),
            self.metrics,
            interval_s=LAG_INTERVAL_S,
            caught_up=self._caught_up,
            availability=self.availability,
        )
        self._lag.start()
        self.heartbeat = time.monotonic()
        self.started = True
        log.info(
            "stage started stage=%s group=%s topics=%s exactly_once=%s",
            self.stage,
            self.settings.group,
            len(self.topics.subscribed),
            self.settings.exactly_once,
        )

    def attach(self, consumer: KafkaConsumer, producer: KafkaProducer) -> None:
        """Use these clients (`start` opens real ones; unit tests attach fakes)."""
        self.consumer, self.producer = consumer, producer
        self.delivery = Delivery(
            self.stage,
            consumer,
            producer,
            self.hooks,
            exactly_once=self.settings.exactly_once,
            on_abort=self._rewind,
            failpoint=Failpoint.from_env(),
            commit_interval_s=self.settings.commit_interval_ms / 1000,
        )
        self.gate = RetryGate(consumer, self.router.policy, self.topics.retries)
        if self.settings.priority_lanes and self.topics.lanes:
            self._lanes = LaneScheduler(
                consumer.client, self.topics.lanes, self.settings.lane_starvation_s
            )

    def run(self) -> None:
        """Run until `stop()`; raise BrokerError if Kafka fails (the process must restart)."""
        if not self.started:
            self.start()
        try:
            while not self.stopping.is_set():
                self.turn()
            if self._fair is not None:
                self._fair.drop()  # unrun: the commit stops before them; read again later
            self._drain()  # graceful stop: finish in-flight work, emit, acknowledge, commit
        except BaseException as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._close()

    def turn(self) -> None:
        """One loop turn: poll → retry gate → process → deliver → commit."""
        assert self.consumer is not None and self.gate is not None
        self._beat()
        self.gate.resume_due()
        if self._lanes is not None:
            self._lanes.before_poll(time.monotonic(), set(self.gate.paused))
        if self._pipeline is not None:
            self._backpressure(self._pipeline)
        self.metrics.paused.set(len(self.gate.paused))
        s = self.settings
        idle_s = s.poll_timeout_ms / 1000
        if self._pipeline is not None and self._pipeline.busy:
            idle_s = min(idle_s, _BUSY_POLL_S)  # results to deliver soon: don't block long
        take = s.batch_max
        if self._fair is not None:
            take = max(s.batch_max, _FAIR_POLL)  # reads ahead into its window
        elif self._pipeline is not None and self._pipeline.full:
            take = 1  # keep polling (group membership), leave the rest in librdkafka's queue
        batch = self.consumer.poll_batch(take, idle_s, s.batch_wait_ms / 1000)
        records = self.gate.admit(batch)
        self.metrics.paused.set(len(self.gate.paused))
        if records:
            self._process(records)
        if self._pipeline is not None:
            for result in self._pipeline.finished():
                self._complete(result)
            self._pipeline.pump(now_iso())  # the worker is free: hand it what was gathered
        if self._fair is not None:
            self._fair.feed(time.monotonic(), now_iso())
        self._settle(idle=not batch)

    def _process(self, records: list[Any]) -> None:
        if self._fair is not None:
            self._fair.add(records, time.monotonic())
        elif self._pipeline is not None:
            self._pipeline.offer(records, now_iso())
        else:
            self._complete(self.step(records, now_iso()))

    def _complete(self, result: BatchResult) -> None:
        assert self.delivery is not None
        if self._fair is not None:
            result = self._fair.settle(result)
        self.hooks.batch_finish(result)
        self.delivery.deliver(result)

    def _settle(self, *, wait: bool = False, sync: bool = False, idle: bool = True) -> None:
        assert self.delivery is not None
        self.delivery.settle(wait=wait, sync=sync, idle=idle)

    def _drain(self) -> None:
        """Finish the work in flight, deliver it, and commit everything acknowledged."""
        if self._pipeline is not None:
            for result in self._pipeline.finished(wait=True):
                self._complete(result)
        self._settle(wait=True, sync=True)

    def _backpressure(self, pipeline: Pipeline) -> None:
        """A full pipeline takes one record per turn, leaving the rest queued in librdkafka
        (whose prefetch bound then stops fetching); at twice the bound the partitions are
        paused, and resumed once the pipeline has drained to half of it. Pausing is the last
        resort: a resumed partition's first fetch can take a fetch round trip or more."""
        assert self.consumer is not None and self.gate is not None
        full = self._fair.full if self._fair is not None else pipeline.overfull
        if full and not self._held:
            lanes = self._lanes.paused if self._lanes is not None else set()
            self._held = [
                tp
                for tp in self.consumer.assignment()
                if tp not in self.gate.paused and tp not in lanes
            ]
            self.consumer.pause_all(self._held)
        elif self._held and (not full if self._fair is not None else pipeline.drained):
            held, self._held = self._held, []
            self.consumer.resume(held)

    def process(self, batch: list[Any]) -> None:
        """One batch through gate, step and delivery, acknowledged and committed before it
        returns (benchmarks and tests drive the runtime with it over fake clients)."""
        assert self.gate is not None
        records = self.gate.admit(batch)
        if records:
            self._complete(self.step(records, now_iso()))
        self._settle(wait=True)

    def stop(self) -> None:
        self.stopping.set()

    def healthy(self) -> bool:
        """Liveness: not failed, the loop makes progress (a record handled or a turn taken
        within `health_stall_s`; setup, e.g. model loading, counts), a pipelined handler with
        work makes progress too, and a broker is reachable (or was within `broker_down_s`).
        A slow batch whose records keep completing is progress; a stuck handler is not."""
        if self.failed is not None or not self.availability.available():
            return False
        if not self.started:
            return True
        now, stall = time.monotonic(), self.settings.health_stall_s
        if now - self.heartbeat > stall:
            return False
        pipeline = self._pipeline
        if pipeline is None or not pipeline.busy:
            return True
        return now - max(self.progress_at, pipeline.started_at or now) <= stall

    def ready(self) -> bool:
        """Readiness: set up, subscribed and healthy."""
        return self.started and self.healthy()

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _progress(self) -> None:
        """A record (or batch) was handled: on the loop's thread, or the pipeline's worker."""
        self.progress_at = now = time.monotonic()
        if self._pipeline is None:
            self.heartbeat = now

    def _close(self) -> None:
        # Graceful stop: the last batch is already emitted and committed; leave the group so
        # the partitions move at once, then release the handler's resources.
        if self._lag is not None:
            self._lag.stop()
        if self._pipeline is not None:
            self._pipeline.close()
        if self.cancels is not None:
            self.cancels.stop()
        try:
            if self.producer is not None:
                self.producer.flush()
            if self.consumer is not None:
                self.consumer.close()
        except Exception as exc:  # KafkaException
            log.warning("close failed stage=%s error=%s", self.stage, exc)
        if self.service.teardown is not None:
            self.service.teardown(self.ctx.resources)
        log.info("stage stopped stage=%s", self.stage)

    # -- rebalance ---------------------------------------------------------------------------

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._lag is not None:
            self._lag.assign((tp.topic, tp.partition) for tp in partitions)

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Served inside poll: every batch read so far is acknowledged and committed here, so
        # the new owner starts after it. Records of these partitions that an earlier consume()
        # of this poll returned are dropped by the gate: the new owner reads them again.
        # librdkafka keeps a partition's pause across revoke and re-assign, so a paused
        # partition is resumed here, else it would come back paused with nothing to resume it.
        assert self.gate is not None and self.consumer is not None
        tps = [(tp.topic, tp.partition) for tp in partitions]
        if self._fair is not None:
            self._fair.drop(tps)  # unrun: the commit stops before them, the new owner reads them
        self._drain()  # in-flight work of every partition: bounded by max_in_flight
        if self._fair is not None:
            self._fair.forget(tps)
        paused = self.gate.on_revoke(tps)
        paused += [tp for tp in tps if tp in self._held]
        self._held = [tp for tp in self._held if tp not in tps]
        if self._lanes is not None:
            paused += [(tp.topic, tp.partition) for tp in self._lanes.on_revoke(partitions)]
        if self._lag is not None:
            self._lag.revoke(tps)
        self.metrics.paused.set(len(self.gate.paused))
        try:
            self.consumer.resume(paused)
        except Exception as exc:  # KafkaException
            log.warning("resume on revoke failed stage=%s error=%s", self.stage, exc)

    def _caught_up(self, tp: TP, high: int) -> bool:
        """Read to the end of `tp` (markers included) and committed all of it (lag report)."""
        assert self.consumer is not None
        end = self.consumer.ends.get(tp)
        waiting = self._fair is not None and self._fair.outstanding > 0
        delivered = self.delivery is not None and self.delivery.idle
        return end is not None and end >= high and delivered and not waiting

    def _rewind(self, aborted: BatchResult) -> None:
        """Read an aborted transaction's batch again, and every batch after it still in
        flight (their results are dropped: committing them would skip the aborted records)."""
        assert self.consumer is not None
        starts = dict(aborted.starts)
        if self._pipeline is not None:
            for later in self._pipeline.finished(wait=True):
                for tp, offset in later.starts.items():
                    starts.setdefault(tp, offset)
        self.consumer.rewind(starts)


def _fair_share(
    settings: StageSettings, lanes: tuple[str, ...], pipeline: Pipeline, step: BatchStep
) -> FairShare:
    limits = TenantLimits(QuotaSettings()) if settings.quota_hold else None
    window = FairWindow(
        lanes,
        weights=settings.tenant_weights,
        default_weight=settings.default_tenant_weight,
        max_records=settings.fair_window,
        max_bytes=settings.fair_window_bytes,
        starvation_s=settings.lane_starvation_s,
        admit=limits.admit if limits is not None else None,
    )
    window.observe = TenantMetrics(settings.stage).observe
    finished = limits.finished if limits is not None else None
    fair = FairShare(window, pipeline, settings.batch_max, finished=finished)
    if limits is not None:  # held past its deadline: failed, reason quota
        fair.held_wait = limits.wait
        fair.refuse = functools.partial(step.refuse, error=quota_refusal)
    return fair


def _probe(conf: dict[str, Any], availability: BrokerAvailability) -> Any:
    """A consumer with the group's id that never subscribes: it reads the group's committed
    offsets and watermarks for the lag report without joining the group."""
    from confluent_kafka import Consumer

    return Consumer({**conf, **availability.callbacks(), "client.id": "conveyor-lag-probe"})
