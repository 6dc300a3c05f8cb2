"""TaskClient refuses a task whose encoded record is over the size limit, before sending."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.client import TaskClient
from conveyor.errors import PermanentError
from conveyor.settings import KafkaSettings, StageSettings

# Nothing listens here; the producer is replaced by a recorder anyway.
NOWHERE = KafkaSettings(kafka_bootstrap="127.0.0.1:9")


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes, **_kw: Any) -> None:
        self.sent.append((topic, value, key))

    def poll(self, _timeout: float) -> int:
        return 0


def client(**kwargs: Any) -> tuple[TaskClient, RecordingProducer]:
    tc = TaskClient(kwargs.pop("settings", NOWHERE), **kwargs)
    recorder = RecordingProducer()
    tc.producer = recorder  # type: ignore[assignment]
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
