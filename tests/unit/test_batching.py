"""Dynamic batching in the stage loop: batch boundaries, the max wait, per-record outcomes."""

from __future__ import annotations

from typing import Any

from conveyor.errors import PermanentError
from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.producer import KafkaProducer
from conveyor.runtime.handler import Emit, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.eventdata import MODERATED, inferred_data, inferred_record
from tests.kafkafakes import FakeConsumerClient, FakeMessage, FakeProducerClient

INFERRED = "conveyor.task.inferred"


def msgs(n: int, start: int = 0) -> list[Any]:
    out: list[Any] = []
    for i in range(start, start + n):
        key, value, headers = inferred_record(f"t{i}")
        out.append(FakeMessage(INFERRED, 0, i, value, key, list(headers)))
    return out


def runner(batch_max: int, wait_ms: int, handle_batch: Any = None) -> StageRunner:
    def default(events: list[Any], _ctx: Any) -> list[Any]:
        return [Emit(MODERATED, _moderated(e.subject)) for e in events]

    service = StageService(
        "moderation",
        StageSettings,
        handle_batch=handle_batch or default,
        accepts=("conveyor.task.inferred.v1",),
    )
    return StageRunner(
        service, StageSettings(stage="moderation", batch_max=batch_max, batch_wait_ms=wait_ms)
    )


def _moderated(task_id: str) -> dict[str, Any]:
    data = inferred_data(task_id)
    return {
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


def test_a_full_queue_is_cut_at_batch_max_without_waiting() -> None:
    client = FakeConsumerClient(msgs(20))
    assert len(KafkaConsumer(client).poll_batch(8, 0.1, 0.05)) == 8
    assert client.calls == [(8, 0)]


def test_a_partial_batch_waits_at_most_batch_wait_for_more() -> None:
    client = FakeConsumerClient(msgs(3), arrivals=msgs(4, start=3))
    batch = KafkaConsumer(client).poll_batch(8, 0.1, 0.05)
    assert [m.offset() for m in batch] == list(range(7))
    assert client.calls == [(8, 0), (5, 0.05)]


def test_an_idle_stage_blocks_only_for_the_first_record() -> None:
    client = FakeConsumerClient([], arrivals=msgs(2))
    assert len(KafkaConsumer(client).poll_batch(8, 0.1, 0)) == 2
    assert client.calls[:2] == [(8, 0), (1, 0.1)]


def test_each_record_of_a_batch_gets_its_own_outcome_and_the_batch_commits_once() -> None:
    def mixed(events: list[Any], _ctx: Any) -> list[Any]:
        return [Emit(MODERATED, _moderated(events[0].subject)), PermanentError("bad one"), None]

    r = runner(batch_max=8, wait_ms=0, handle_batch=mixed)
    consumer, producer = FakeConsumerClient(msgs(3)), FakeProducerClient()
    r.attach(KafkaConsumer(consumer), KafkaProducer(producer, delivery_timeout_s=1))
    r.turn()
    topics = [record.topic for record in producer.records]
    # Record 1 emits, record 2 is dead-lettered with its status event, record 3 emits nothing.
    assert topics == ["conveyor.task.moderated", "conveyor.moderation.dlq", "conveyor.task.status"]
    assert len(consumer.commits) == 1 and consumer.commits[0][0].offset == 3
