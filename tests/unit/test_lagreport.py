"""Lag per partition: high watermark minus committed, 0 for a partition read to its end, no
series for a revoked partition, nothing published when the broker does not answer."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from prometheus_client import REGISTRY

from conveyor.kafka.health import BrokerAvailability
from conveyor.runtime.lagreport import LagReporter
from conveyor.telemetry.metrics import StageMetrics


class FakeProbe:
    def __init__(self, committed: dict[tuple[str, int], int], highs: dict[tuple[str, int], int]):
        self.committed_offsets, self.highs = committed, highs
        self.down = False
        self.closed = False

    def committed(self, parts: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return [
            TopicPartition(
                p.topic, p.partition, self.committed_offsets.get((p.topic, p.partition), -1001)
            )
            for p in parts
        ]

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return 0, self.highs[(tp.topic, tp.partition)]

    def close(self) -> None:
        self.closed = True


def lag(stage: str, topic: str, partition: int) -> Any:
    labels = {"stage": stage, "topic": topic, "partition": str(partition)}
    return REGISTRY.get_sample_value("conveyor_consumer_lag", labels)


def test_lag_is_published_per_partition_and_zero_when_read_to_the_end() -> None:
    probe = FakeProbe({("in", 0): 10, ("in", 1): 7}, {("in", 0): 11, ("in", 1): 12})
    at_end = {("in", 0)}  # its last offset is a transaction marker the commit cannot cover
    availability = BrokerAvailability(10)
    availability.down()
    reporter = LagReporter(
        probe,
        StageMetrics("lagtest"),
        interval_s=60,
        caught_up=lambda tp, high: tp in at_end,
        availability=availability,
    )
    reporter.assign([("in", 0), ("in", 1)])
    assert reporter.refresh() == {("in", 0): 0, ("in", 1): 5}
    assert lag("lagtest", "in", 1) == 5 and lag("lagtest", "in", 0) == 0
    assert availability.down_since is None  # the broker answered

    reporter.revoke([("in", 1)])
    assert lag("lagtest", "in", 1) is None  # another instance reports it now
    assert reporter.refresh() == {("in", 0): 0}

    probe.down = True
    assert reporter.refresh() == {}
    reporter.stop()
    assert probe.closed
