"""Bounded reads: a range of offsets per partition, read to its end, then stop.

The tools never follow a topic: they read what was there when they started (up to the high
watermarks observed at start, or an explicit end offset) and return. The consumer is assigned its
partitions (no group membership, nothing committed), reads `read_committed` so aborted
transactional output is never listed or redriven, and reports partition EOF so a range that ends
in a transaction marker still completes. Every read has a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from conveyor.errors import BrokerError
from conveyor.kafka.config import common
from conveyor.settings import KafkaSettings

TP = tuple[str, int]
Ranges = dict[TP, tuple[int, int]]  # partition -> [start, end)
# Metadata and watermark requests: a healthy cluster answers in milliseconds.
META_TIMEOUT_S = 10.0
# A bounded read of a DLQ or a replay range; raise rather than return a partial answer.
READ_TIMEOUT_S = 120.0
_TRANSIENT = frozenset(
    (
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    )
)


@contextmanager
def open_reader(settings: KafkaSettings) -> Iterator[Consumer]:
    conf: dict[str, Any] = {
        **common(settings),
        # Required by the client; never joined (partitions are assigned) and never committed.
        "group.id": f"{settings.topic_prefix}conveyor.dlq-tools.{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
    }
    consumer = Consumer(conf)
    try:
        yield consumer
    finally:
        consumer.close()


def partitions_of(consumer: Consumer, topic: str) -> list[int] | None:
    """The topic's partition ids, or None when it does not exist."""
    meta = consumer.list_topics(topic, timeout=META_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None:
        return None
    return sorted(meta.partitions)


def watermarks(consumer: Consumer, topics: list[str]) -> Ranges:
    """(low, high) per partition of every existing topic: the whole of what is there now."""
    out: Ranges = {}
    for topic in topics:
        for partition in partitions_of(consumer, topic) or ():
            out[(topic, partition)] = _watermark(consumer, TopicPartition(topic, partition))
    return out


def _watermark(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    # Right after a topic is created, or during a leader change, the broker answers
    # NOT_LEADER / LEADER_NOT_AVAILABLE for a moment: retry those until the deadline.
    deadline = time.monotonic() + META_TIMEOUT_S
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, timeout=META_TIMEOUT_S, cached=False)
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0]
            if not error.retriable() and error.code() not in _TRANSIENT:
                raise BrokerError(f"watermarks of {tp.topic}[{tp.partition}]: {error}") from exc
            if time.monotonic() > deadline:
                raise BrokerError(f"watermarks of {tp.topic}[{tp.partition}]: {error}") from exc
            time.sleep(0.1)  # back off before asking again


def offsets_at(consumer: Consumer, tps: list[TP], ms: int, marks: Ranges) -> dict[TP, int]:
    """Per partition, the first offset whose timestamp is >= `ms` (the high mark if none)."""
    asked = [TopicPartition(t, p, ms) for t, p in tps]
    found = consumer.offsets_for_times(asked, timeout=META_TIMEOUT_S)
    out = {}
    for tp in found:
        if tp.error is not None:
            raise BrokerError(
                f"offsets_for_times failed for {tp.topic}[{tp.partition}]: {tp.error}"
            )
        key = (tp.topic, tp.partition)
        offset = tp.offset if tp.offset is not None else -1
        out[key] = offset if offset >= 0 else marks[key][1]
    return out


def read_range(
    consumer: Consumer, ranges: Ranges, *, timeout_s: float = READ_TIMEOUT_S
) -> Iterator[Message]:
    """Yield every record with start <= offset < end, per partition, then stop."""
    pending = {tp: r for tp, r in ranges.items() if r[0] < r[1]}
    if not pending:
        return
    consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in pending.items()])
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"read did not reach the end of {sorted(pending)} in {timeout_s}s"
                )
            for msg in consumer.consume(500, 0.5):
                tp = (msg.topic(), msg.partition())
                if tp not in pending:
                    continue
                end = pending[tp][1]
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        del pending[tp]  # at the end (the LSO, read_committed) before `end`
                        continue
                    if err.fatal():
                        raise BrokerError(f"read failed: {err}")
                    continue  # transient (librdkafka recovers); the deadline bounds it
                offset = msg.offset() or 0
                if offset < end:
                    yield msg
                if offset >= end - 1:
                    del pending[tp]
            _drop_passed(consumer, pending)
    finally:
        consumer.unassign()


def _drop_passed(consumer: Consumer, pending: Ranges) -> None:
    # A range may end in transaction markers, which are never delivered: the position moves
    # past them, and then the range is done.
    if not pending:
        return
    for tp in consumer.position([TopicPartition(t, p) for t, p in pending]):
        key = (tp.topic, tp.partition)
        if key in pending and (tp.offset or 0) >= pending[key][1]:
            del pending[key]
