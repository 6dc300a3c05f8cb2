"""In-memory fakes of the librdkafka clients, satisfying `conveyor.kafka.protocols`.

Unit tests drive the client wrappers and the stage loop with them: records are handed out from
a queue, produced records are kept, delivery reports are served on `poll`/`flush` (or held back,
to test waiting), and commits are recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from confluent_kafka import KafkaError, TopicPartition

from conveyor.kafka.protocols import DeliveryCallback, RawHeaders, RebalanceCallback


class FakeMessage:
    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        value: bytes | None = b"",
        key: bytes | None = None,
        headers: RawHeaders | None = None,
        *,
        error: KafkaError | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._key, self._headers, self._error = value, key, headers, error
        self._ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)

    def error(self) -> KafkaError | None:
        return self._error

    def topic(self) -> str | None:
        return self._topic

    def partition(self) -> int | None:
        return self._partition

    def offset(self) -> int | None:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> RawHeaders | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


class FakeConsumerClient:
    """Hands out queued records; a consume() with a timeout takes `arrivals` first."""

    def __init__(self, queued: list[Any] | None = None, arrivals: list[Any] | None = None) -> None:
        self.queued: list[Any] = list(queued or [])
        self.arrivals: list[Any] = list(arrivals or [])
        self.calls: list[tuple[int, float]] = []
        self.commits: list[list[TopicPartition]] = []
        self.paused: list[tuple[str, int]] = []
        self.seeks: list[tuple[str, int, int]] = []
        self.assigned: list[TopicPartition] = []
        self.closed = False

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
        on_lost: RebalanceCallback | None = None,
    ) -> None:
        self.topics = topics

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        self.calls.append((num_messages, timeout))
        if not self.queued and timeout > 0:
            self.queued, self.arrivals = self.arrivals, []
        out, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return out

    @overload
    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[True] = ...
    ) -> None: ...
    @overload
    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[False]
    ) -> list[TopicPartition]: ...
    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: bool = True
    ) -> list[TopicPartition] | None:
        self.commits.append(offsets)
        return None if asynchronous else offsets

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused += [(tp.topic, tp.partition) for tp in partitions]

    def resume(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.paused.remove((tp.topic, tp.partition))

    def seek(self, partition: TopicPartition) -> None:
        self.seeks.append((partition.topic, partition.partition, partition.offset))

    def assignment(self) -> list[TopicPartition]:
        return self.assigned

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return partitions

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return (0, 0)

    def consumer_group_metadata(self) -> Any:
        return "group-metadata"

    def close(self) -> None:
        self.closed = True


@dataclass
class Produced:
    topic: str
    value: str | bytes | None
    key: str | bytes | None
    headers: RawHeaders | None
    partition: int


@dataclass
class FakeProducerClient:
    """Keeps produced records; serves delivery reports on poll/flush unless `hold` is set.

    `full` makes the next n produce() calls raise BufferError (a full local queue); `fail`
    makes every delivery report carry that error.
    """

    records: list[Produced] = field(default_factory=list)
    hold: bool = False
    full: int = 0
    fail: KafkaError | None = None
    reports: list[tuple[DeliveryCallback, Produced]] = field(default_factory=list)
    polls: int = 0
    transactions: list[str] = field(default_factory=list)

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        *,
        partition: int = -1,
        on_delivery: DeliveryCallback | None = None,
        headers: RawHeaders | None = None,
    ) -> None:
        if self.full:
            self.full -= 1
            raise BufferError("queue full")
        record = Produced(topic, value, key, headers, partition)
        self.records.append(record)
        if on_delivery is not None:
            self.reports.append((on_delivery, record))

    def poll(self, timeout: float = -1) -> int:
        self.polls += 1
        return self._serve()

    def flush(self, timeout: float = -1) -> int:
        self._serve()
        return len(self.reports)

    def _serve(self) -> int:
        if self.hold:
            return 0
        reports, self.reports = self.reports, []
        for callback, record in reports:
            callback(self.fail, record)
        return len(reports)

    def init_transactions(self, timeout: float = -1) -> None:
        self.transactions.append("init")

    def begin_transaction(self) -> None:
        self.transactions.append("begin")

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: Any, timeout: float = -1
    ) -> None:
        self.transactions.append(f"offsets {[(p.topic, p.partition, p.offset) for p in positions]}")

    def commit_transaction(self, timeout: float = -1) -> None:
        self._serve()
        self.transactions.append("commit")

    def abort_transaction(self, timeout: float = -1) -> None:
        self.transactions.append("abort")
