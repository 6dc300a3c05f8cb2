"""Consumer-group lag read from outside the group: committed offsets against high watermarks.

`GroupLag` asks the group coordinator for a group's committed offsets (OffsetFetch) and each
partition leader for its high watermark, through a consumer that carries the group's id but never
subscribes, so it never joins the group, triggers a rebalance or commits. A partition the group has
not committed yet counts from its low watermark (stages start at `earliest`). `CachedLag` keeps the
total for a few seconds so a busy HTTP endpoint costs the broker one probe per interval. The
gateway uses it for its queue position estimate; any component that wants a backlog figure can.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaException, TopicPartition

from conveyor.errors import BrokerError
from conveyor.kafka.config import common
from conveyor.settings import KafkaSettings

log = logging.getLogger(__name__)


class GroupLag:
    """The lag of consumer group `group` on `topics`, per partition. Not thread-safe by itself."""

    def __init__(
        self, settings: KafkaSettings, group: str, topics: Sequence[str], *, timeout_s: float = 5.0
    ) -> None:
        self.group = group
        self.topics = list(topics)
        self.timeout_s = timeout_s
        self._consumer = Consumer(
            {
                **common(settings),
                "group.id": group,
                # Read-only observer: it must never commit on the group's behalf.
                "enable.auto.commit": False,
                "client.id": "conveyor-lag-probe",
            }
        )

    def partitions(self) -> dict[tuple[str, int], int]:
        """{(topic, partition): records not yet committed by the group}; raises `BrokerError`."""
        try:
            parts = [tp for topic in self.topics for tp in self._partitions_of(topic)]
            committed = self._consumer.committed(parts, timeout=self.timeout_s)
            return {(tp.topic, tp.partition): self._lag_of(tp) for tp in committed}
        except KafkaException as exc:
            raise BrokerError(f"lag of group {self.group} unavailable: {exc}") from exc

    def total(self) -> int:
        """Sum of the group's lag over every partition of its topics."""
        return sum(self.partitions().values())

    def close(self) -> None:
        self._consumer.close()

    def _partitions_of(self, topic: str) -> list[TopicPartition]:
        meta = self._consumer.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise BrokerError(f"topic {topic} unavailable: {meta.error if meta else 'missing'}")
        return [TopicPartition(topic, p) for p in sorted(meta.partitions)]

    def _lag_of(self, committed: TopicPartition) -> int:
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(committed.topic, committed.partition),
            timeout=self.timeout_s,
            cached=False,
        )
        start = committed.offset if committed.offset >= 0 else low  # negative: nothing committed
        return max(high - start, 0)


class CachedLag:
    """A lag total refreshed at most every `ttl_s`; None while it cannot be read.

    Thread-safe. One caller refreshes while the others get the previous value at once, so a slow
    or unreachable broker delays one request per interval, not all of them. A failed probe is also
    cached for `ttl_s`, so an outage is not hammered with probes.
    """

    def __init__(
        self,
        probe: Callable[[], int],
        *,
        ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: int | None = None
        self._expires = float("-inf")

    def value(self) -> int | None:
        if self._clock() < self._expires or not self._lock.acquire(blocking=False):
            return self._value
        try:
            if self._clock() >= self._expires:
                self._value = self._read()
                self._expires = self._clock() + self._ttl_s
            return self._value
        finally:
            self._lock.release()

    def _read(self) -> int | None:
        try:
            return self._probe()
        except BrokerError as exc:
            log.warning("consumer lag unavailable error=%s", exc)
            return None
