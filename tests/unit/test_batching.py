"""Dynamic batching in the stage loop: batch boundaries, the max wait, per-record outcomes."""

from __future__ import annotations

import time
from typing import Any

from conveyor.errors import PermanentError
from conveyor.runtime.handler import Emit, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.eventdata import MODERATED, inferred_data, inferred_record


class Msg:
    def __init__(self, offset: int, key: bytes, value: bytes, headers: list[Any]) -> None:
        self._offset, self._key, self._value, self._headers = offset, key, value, headers

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "conveyor.task.inferred"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[Any]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, int(time.time() * 1000))


class FakeConsumer:
    """Hands out queued records; a consume() with a timeout waits for `arrivals` first."""

    def __init__(self, queued: list[Msg], arrivals: list[Msg] | None = None) -> None:
        self.queued, self.arrivals = queued, arrivals or []
        self.calls: list[tuple[int, float]] = []
        self.commits: list[Any] = []

    def consume(self, n: int, timeout: float) -> list[Msg]:
        self.calls.append((n, timeout))
        if not self.queued and timeout > 0:
            self.queued, self.arrivals = self.arrivals, []
        out, self.queued = self.queued[:n], self.queued[n:]
        return out

    def commit(self, **kwargs: Any) -> None:
        self.commits.append(kwargs["offsets"])


class FakeProducer:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **_: Any) -> None:
        self.records.append((topic, value))

    def flush(self, _timeout: float = 0) -> int:
        return 0

    def poll(self, _timeout: float = 0) -> int:
        return 0


def msgs(n: int, start: int = 0) -> list[Msg]:
    return [Msg(start + i, *inferred_record(f"t{start + i}")) for i in range(n)]


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
    r = runner(batch_max=8, wait_ms=50)
    r.consumer = FakeConsumer(msgs(20))  # type: ignore[assignment]
    assert len(r._poll()) == 8
    assert r.consumer.calls == [(8, 0)]  # type: ignore[union-attr]


def test_a_partial_batch_waits_at_most_batch_wait_for_more() -> None:
    r = runner(batch_max=8, wait_ms=50)
    r.consumer = FakeConsumer(msgs(3), arrivals=msgs(4, start=3))  # type: ignore[assignment]
    batch = r._poll()
    assert [m.offset() for m in batch] == list(range(7))
    assert r.consumer.calls == [(8, 0), (5, 0.05)]  # type: ignore[union-attr]


def test_an_idle_stage_blocks_only_for_the_first_record() -> None:
    r = runner(batch_max=8, wait_ms=0)
    r.consumer = FakeConsumer([], arrivals=msgs(2))  # type: ignore[assignment]
    assert len(r._poll()) == 2
    assert r.consumer.calls[:2] == [(8, 0), (1, 0.1)]  # type: ignore[union-attr]


def test_each_record_of_a_batch_gets_its_own_outcome_and_the_batch_commits_once() -> None:
    def mixed(events: list[Any], _ctx: Any) -> list[Any]:
        return [Emit(MODERATED, _moderated(events[0].subject)), PermanentError("bad one"), None]

    r = runner(batch_max=8, wait_ms=0, handle_batch=mixed)
    consumer, producer = FakeConsumer(msgs(3)), FakeProducer()
    r.consumer, r.producer = consumer, producer  # type: ignore[assignment]
    r._process(r._poll())
    topics = [topic for topic, _ in producer.records]
    # Record 1 emits, record 2 is dead-lettered with its status event, record 3 emits nothing.
    assert topics == ["conveyor.task.moderated", "conveyor.moderation.dlq", "conveyor.task.status"]
    assert len(consumer.commits) == 1 and consumer.commits[0][0].offset == 3
