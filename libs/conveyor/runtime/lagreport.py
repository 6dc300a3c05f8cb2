"""Consumer lag per assigned partition, refreshed on a thread of its own.

The refresh asks the broker for the group's committed offsets and each partition's high
watermark, a round trip per partition: done on the stage loop it stalled every stage for ~0.5 s
every interval (the p99 of the whole pipeline). Here it runs beside the loop, through a probe
consumer that carries the group's id but never joins it.

Lag is the high watermark minus the committed offset, except that a partition the stage has
read to its end (librdkafka's end-of-partition event, which counts transaction markers) and
committed everything it read from has lag 0: the offset after an exactly-once producer's last
record is its commit marker, which no consumer commit ever covers. A revoked partition's series
is dropped, so a pod reports only the partitions it owns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from conveyor.kafka.health import BrokerAvailability
from conveyor.telemetry.metrics import StageMetrics

log = logging.getLogger(__name__)
TP = tuple[str, int]
# Bounds one probe round trip, so a stop waits at most this long for the thread.
PROBE_TIMEOUT_S = 2.0


class LagReporter:
    def __init__(
        self,
        probe: Any,  # a confluent-kafka Consumer with the group's id, never subscribed
        metrics: StageMetrics,
        *,
        interval_s: float,
        caught_up: Callable[[TP, int], bool],
        availability: BrokerAvailability | None = None,
    ) -> None:
        self.probe = probe
        self.metrics = metrics
        self.interval_s = interval_s
        self.caught_up = caught_up  # (partition, high watermark) -> read and committed to it
        self.availability = availability
        self.assigned: frozenset[TP] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-report", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(PROBE_TIMEOUT_S * 2)
        if self._thread.is_alive():
            return  # still inside a probe call (broker away): never close a client in use
        try:
            self.probe.close()
        except Exception as exc:
            log.debug("lag probe close failed error=%s", exc)

    def assign(self, partitions: Iterable[TP]) -> None:
        self.assigned = self.assigned | frozenset(partitions)

    def revoke(self, partitions: Iterable[TP]) -> None:
        gone = frozenset(partitions)
        self.assigned = self.assigned - gone
        for topic, partition in gone:
            self.metrics.drop_lag(topic, partition)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def refresh(self) -> Mapping[TP, int]:
        """Read and publish the lag of every assigned partition; {} when it cannot be read."""
        assigned = self.assigned
        if not assigned:
            return {}
        try:
            lags = self._read(assigned)
        except KafkaException as exc:
            log.debug("lag refresh failed stage=%s error=%s", self.metrics.stage, exc)
            return {}
        if self.availability is not None:
            self.availability.up()  # the broker answered
        for (topic, partition), lag in lags.items():
            if (topic, partition) in self.assigned:  # not revoked in the meantime
                self.metrics.lag(topic, partition, lag)
        return lags

    def _read(self, assigned: frozenset[TP]) -> dict[TP, int]:
        parts = [TopicPartition(t, p) for t, p in sorted(assigned)]
        out = {}
        for tp in self.probe.committed(parts, timeout=PROBE_TIMEOUT_S):
            if self._stop.is_set():
                break
            _, high = self.probe.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=PROBE_TIMEOUT_S, cached=False
            )
            key = (tp.topic, tp.partition)
            committed = tp.offset if tp.offset >= 0 else 0
            out[key] = 0 if self.caught_up(key, high) else max(high - committed, 0)
        return out
