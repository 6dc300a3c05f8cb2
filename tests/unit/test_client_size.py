"""TaskClient refuses a task whose encoded record is over the size limit, before sending."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.client import TaskClient
from conveyor.errors import BrokerError, PermanentError
from conveyor.kafka.producer import KafkaProducer
from conveyor.settings import KafkaSettings, StageSettings
from tests.kafkafakes import FakeProducerClient

# Nothing listens here; the producer is replaced by a recorder anyway.
NOWHERE = KafkaSettings(kafka_bootstrap="127.0.0.1:9")


class RecordingProducer(FakeProducerClient):
    @property
    def sent(self) -> list[tuple[str, Any, Any]]:
        return [(r.topic, r.value, r.key) for r in self.records]


def client(**kwargs: Any) -> tuple[TaskClient, RecordingProducer]:
    recorder = RecordingProducer()
    producer = KafkaProducer(recorder, delivery_timeout_s=1)
    tc = TaskClient(kwargs.pop("settings", NOWHERE), producer=producer, **kwargs)
    return tc, recorder


def test_oversize_task_raises_permanent_error_and_sends_nothing() -> None:
    tc, recorder = client(max_record_bytes=4096)
    with pytest.raises(PermanentError, match="over the 4096-byte record limit"):
        tc.submit({"task_id": "big-1", "tenant": "acme", "kind": "embed", "input": "x" * 5000})
    assert recorder.sent == []


def test_task_under_the_limit_is_sent() -> None:
    tc, recorder = client(max_record_bytes=4096)
    task_id, _ = tc.submit(
        {"task_id": "small-1", "tenant": "acme", "kind": "embed", "input": "x" * 1000}
    )
    assert task_id == "small-1"
    assert [key for _, _, key in recorder.sent] == [b"small-1"]


def test_limit_defaults_to_the_stage_setting() -> None:
    assert client()[0].max_record_bytes == 1_000_000
    stage = StageSettings(kafka_bootstrap="127.0.0.1:9", max_record_bytes=2048)
    assert client(settings=stage)[0].max_record_bytes == 2048


def test_flush_waits_for_acknowledgements_and_reports_a_failed_one() -> None:
    from confluent_kafka import KafkaError

    tc, recorder = client()
    tc.submit({"task_id": "ok-1", "tenant": "acme", "kind": "embed", "input": "x"})
    tc.flush(1)
    recorder.fail = KafkaError(KafkaError._MSG_TIMED_OUT)
    tc.submit({"task_id": "lost-1", "tenant": "acme", "kind": "embed", "input": "x"})
    with pytest.raises(BrokerError, match="submit failed"):
        tc.flush(1)


def test_a_full_queue_fails_at_once_when_the_caller_cannot_wait() -> None:
    tc, recorder = client()
    recorder.full = 10**6
    with pytest.raises(BrokerError, match="queue stayed full"):
        tc.submit(
            {"task_id": "q-1", "tenant": "acme", "kind": "embed", "input": "x"}, queue_wait_s=0
        )
