"""The batch step and the stage loop over fake clients, with recording telemetry hooks:
per-record outcomes, failure isolation, hooks, commit order, liveness and broker health."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, TopicPartition
from opentelemetry.trace import INVALID_SPAN, Span

from conveyor.errors import PermanentError
from conveyor.events.model import Event
from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.producer import KafkaProducer
from conveyor.kafka.protocols import Message
from conveyor.runtime.handler import Emit, StageService
from conveyor.runtime.hooks import StageHooks
from conveyor.runtime.routing import Item, OutRecord
from conveyor.runtime.stage import StageRunner
from conveyor.runtime.step import BatchResult, RecordOutcome
from conveyor.settings import StageSettings
from tests.eventdata import INFERRED_TOPIC, MODERATED, inferred_data, inferred_record
from tests.kafkafakes import FakeConsumerClient, FakeMessage, FakeProducerClient


class RecordingHooks:
    """A `StageHooks` that records what the runtime told it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def record_start(self, msg: Message, headers: Mapping[str, str], event: Event | None) -> Span:
        self.calls.append(("record_start", msg.offset()))
        return INVALID_SPAN

    def record_finish(self, outcome: RecordOutcome, error: BaseException | None = None) -> None:
        self.calls.append(("record_finish", (outcome.item.offset, outcome.name)))

    def record_enter(self, item: Item) -> object:
        self.calls.append(("record_enter", item.offset))
        return item.offset

    def record_exit(self, token: object) -> None:
        self.calls.append(("record_exit", token))

    def batch_enter(self, items: Sequence[Item]) -> object:
        self.calls.append(("batch_enter", [i.offset for i in items]))
        return None

    def batch_exit(self, token: object) -> None:
        self.calls.append(("batch_exit", None))

    def handler_start(self, items: Sequence[Item]) -> object:
        self.calls.append(("handler_start", len(items)))
        return None

    def handler_finish(self, token: object, items: Sequence[Item]) -> None:
        self.calls.append(("handler_finish", len(items)))

    def batch_finish(self, result: BatchResult) -> None:
        self.calls.append(("batch_finish", dict(result.consumed)))

    def delivered(self, outputs: Sequence[OutRecord]) -> None:
        self.calls.append(("delivered", len(outputs)))

    def named(self, name: str) -> list[Any]:
        return [arg for call, arg in self.calls if call == name]


def msgs(n: int, start: int = 0, partition: int = 0) -> list[Any]:
    out: list[Any] = []
    for i in range(start, start + n):
        key, value, headers = inferred_record(f"t{partition}-{i}")
        out.append(FakeMessage(INFERRED_TOPIC, partition, i, value, key, list(headers)))
    return out


def moderated(event: Event) -> Emit:
    data = inferred_data(event.subject or "")
    body = {
        "task": data["task"],
        "model": "tiny",
        "text": "x",
        "embedding": None,
        "label": None,
        "label_scores": {},
        "verdict": "allow",
        "scores": {},
        "reasons": [],
    }
    return Emit(MODERATED, body)


def make_runner(
    *, handle: Any = None, handle_batch: Any = None, hooks: StageHooks | None = None, **env: Any
) -> tuple[StageRunner, FakeConsumerClient, FakeProducerClient]:
    service = StageService(
        "moderation",
        StageSettings,
        handle=handle,
        handle_batch=handle_batch,
        accepts=("conveyor.task.inferred.v1",),
    )
    settings = StageSettings(stage="moderation", batch_max=64, **env)
    runner = StageRunner(service, settings, hooks=hooks)
    consumer, producer = FakeConsumerClient(), FakeProducerClient()
    runner.attach(KafkaConsumer(consumer), KafkaProducer(producer, delivery_timeout_s=1))
    runner.started = True
    return runner, consumer, producer


def test_a_batch_handler_that_raises_fails_only_the_record_at_fault() -> None:
    def batch(events: Sequence[Event], _ctx: Any) -> list[Emit]:
        if any(e.subject == "t0-13" for e in events):
            raise RuntimeError("record 13 breaks the model")
        return [moderated(e) for e in events]

    runner, consumer, producer = make_runner(handle_batch=batch)
    consumer.queued = msgs(32)
    runner.turn()
    topics = [r.topic for r in producer.records]
    assert topics.count("conveyor.task.moderated") == 31
    assert topics.count("conveyor.moderation.retry.1") == 1
    retried = next(r for r in producer.records if r.topic == "conveyor.moderation.retry.1")
    assert retried.key == b"t0-13"
    assert consumer.commits[-1][0].offset == 32


def test_hooks_see_every_record_start_and_finish_and_one_batch() -> None:
    hooks = RecordingHooks()

    def one(event: Event, _ctx: Any) -> Emit:
        if event.subject == "t0-1":
            raise PermanentError("bad")
        return moderated(event)

    runner, consumer, _ = make_runner(handle=one, hooks=hooks)
    consumer.queued = msgs(3)
    runner.turn()
    assert hooks.named("record_start") == [0, 1, 2]
    assert hooks.named("record_finish") == [(0, "emitted"), (1, "dead-lettered"), (2, "emitted")]
    assert hooks.named("record_enter") == [0, 1, 2] == hooks.named("record_exit")
    assert hooks.named("handler_start") == [3] == hooks.named("handler_finish")
    assert hooks.named("batch_finish") == [{INFERRED_TOPIC: 3}]
    assert hooks.named("delivered") == [4]  # two outputs, a dead letter and its status event


def test_the_loop_reads_on_before_acks_and_commits_batches_in_order() -> None:
    runner, consumer, producer = make_runner(handle=lambda e, _ctx: moderated(e))
    producer.hold = True  # the broker has not acknowledged anything yet
    consumer.queued = msgs(2)
    runner.turn()
    consumer.queued = msgs(2, start=2)
    runner.turn()  # read and produced while the first batch waits for its acks
    assert len(producer.records) == 4 and consumer.commits == []
    producer.hold = False
    runner.turn()
    assert [[p.offset for p in c] for c in consumer.commits] == [[4]]  # both, newest offset


def test_a_stage_making_progress_stays_live_through_a_batch_longer_than_the_stall_limit() -> None:
    observed: list[bool] = []

    def slow(event: Event, _ctx: Any) -> Emit:
        time.sleep(0.3)  # each record well within the limit, the batch three times over it
        observed.append(runner.healthy())
        return moderated(event)

    runner, consumer, _ = make_runner(handle=slow, health_stall_s=1.0)
    consumer.queued = msgs(10)
    runner.turn()
    assert observed == [True] * 10


def test_a_stuck_handler_makes_the_stage_unhealthy_within_the_stall_limit() -> None:
    observed: list[bool] = []

    def stuck(event: Event, _ctx: Any) -> Emit:
        deadline = time.monotonic() + 5
        while runner.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        observed.append(runner.healthy())
        return moderated(event)

    runner, consumer, _ = make_runner(handle=stuck, health_stall_s=0.3)
    consumer.queued = msgs(1)
    started = time.monotonic()
    runner.turn()
    assert observed == [False] and time.monotonic() - started < 4
    runner.turn()  # the loop turns again: live
    assert runner.healthy()


def test_every_broker_down_past_the_limit_fails_health_and_an_answer_restores_it() -> None:
    runner, _, _ = make_runner(handle=lambda e, _ctx: moderated(e), broker_down_s=0.2)
    runner.availability.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert runner.healthy()
    time.sleep(0.3)
    assert not runner.healthy()
    runner.availability.on_commit(None, [])
    assert runner.healthy()


def test_a_pipelined_stage_keeps_turning_while_its_handler_works_and_commits_in_order() -> None:
    release = threading.Event()

    def slow(event: Event, _ctx: Any) -> Emit:
        release.wait(10)
        return moderated(event)

    runner, consumer, producer = make_runner(handle=slow, pipelined=True, max_in_flight=2)
    consumer.assigned = [TopicPartition(INFERRED_TOPIC, 0)]
    consumer.queued = msgs(2)
    runner.turn()
    consumer.queued = msgs(2, start=2)
    runner.turn()  # the loop read on while the handler works on the first batch
    assert producer.records == [] and consumer.commits == []
    assert len(consumer.queued) == 1  # at the bound: one record per turn
    runner.turn()
    runner.turn()  # twice the bound in flight: the partition is paused, the loop still turns
    assert consumer.paused == [(INFERRED_TOPIC, 0)]
    release.set()
    deadline = time.monotonic() + 10
    while (not consumer.commits or consumer.commits[-1][0].offset < 4) and (
        time.monotonic() < deadline
    ):
        runner.turn()
    assert [r.key for r in producer.records] == [b"t0-0", b"t0-1", b"t0-2", b"t0-3"]
    offsets = [c[0].offset for c in consumer.commits]
    assert offsets == sorted(offsets) and offsets[-1] == 4  # in order, up to the last one
    runner.turn()
    assert consumer.paused == []  # resumed once the pipeline drained


def test_a_stuck_pipelined_handler_fails_liveness_although_the_loop_turns() -> None:
    release = threading.Event()

    def stuck(event: Event, _ctx: Any) -> Emit:
        release.wait(10)
        return moderated(event)

    runner, consumer, _ = make_runner(handle=stuck, pipelined=True, health_stall_s=0.3)
    consumer.queued = msgs(1)
    runner.turn()
    deadline = time.monotonic() + 5
    while runner.healthy() and time.monotonic() < deadline:
        runner.turn()  # the loop is fine; the handler is not
    assert not runner.healthy()
    release.set()
    runner._drain()
    runner.turn()
    assert runner.healthy()
    runner._close()
