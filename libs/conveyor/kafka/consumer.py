"""The one consumer behaviour of a stage: batched polling, commits, pauses, consumer events.

`KafkaConsumer` wraps a librdkafka consumer (anything satisfying `ConsumerClient`):
- `poll_batch` drains what is queued without waiting, blocks only for the first record of an
  idle stage, then waits up to `batch_wait_s` for more (dynamic batching);
- consumer events in the stream are handled here: end-of-partition is remembered per partition
  (lag reporting: an exactly-once input ends with a transaction marker that no offset commit
  covers), a fatal error raises `BrokerError`, anything else is logged;
- commits are asynchronous with their results reported to `BrokerAvailability.on_commit`.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from conveyor.errors import BrokerError
from conveyor.kafka.health import BrokerAvailability
from conveyor.kafka.protocols import ConsumerClient, Message, RebalanceCallback

log = logging.getLogger(__name__)
TP = tuple[str, int]


class KafkaConsumer:
    def __init__(self, client: ConsumerClient) -> None:
        self.client = client
        # partition -> offset just past its end (transaction markers included), set when the
        # consumer reached the end of the partition and cleared when a record comes after it.
        self.ends: dict[TP, int] = {}

    @classmethod
    def open(cls, conf: dict[str, Any], *, availability: BrokerAvailability) -> KafkaConsumer:
        from confluent_kafka import Consumer

        conf = {
            **conf,
            **availability.callbacks(),
            "on_commit": availability.on_commit,
            # End-of-partition events tell the lag reporter the consumer is caught up.
            "enable.partition.eof": True,
        }
        return cls(Consumer(conf))

    def subscribe(
        self, topics: list[str], *, on_assign: RebalanceCallback, on_revoke: RebalanceCallback
    ) -> None:
        self.client.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)

    def poll_batch(self, max_records: int, idle_wait_s: float, batch_wait_s: float) -> list[Any]:
        """Up to `max_records` records (never consumer events), see the module docstring."""
        # consume(n, t) blocks until n records or t: drain what is queued without waiting,
        # and block only for the first record of an idle stage.
        batch = self.client.consume(max_records, 0)
        if not batch:
            batch = self.client.consume(1, idle_wait_s)
        if batch and len(batch) < max_records:
            batch += self.client.consume(max_records - len(batch), batch_wait_s)
        return self._records(batch)

    def _records(self, batch: list[Any]) -> list[Any]:
        if not self.ends and all(msg.error() is None for msg in batch):
            return batch  # the common case: nothing to filter
        out = []
        for msg in batch:
            err = msg.error()
            if err is None:
                self.ends.pop((msg.topic(), msg.partition()), None)
                out.append(msg)
            else:
                self._on_event(msg, err)
        return out

    def _on_event(self, msg: Message, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            self.ends[(str(msg.topic()), int(msg.partition() or 0))] = int(msg.offset() or 0)
            return
        if err.fatal():
            raise BrokerError(f"consumer failed: {err}")
        log.warning("consume error error=%s", err)

    def commit(self, offsets: dict[TP, int]) -> None:
        """Commit asynchronously; the result goes to `on_commit`."""
        if offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            self.client.commit(offsets=tps, asynchronous=True)

    def commit_now(self, offsets: dict[TP, int]) -> None:
        """Commit and wait for the answer (a revoke: the partitions are about to move)."""
        if offsets:
            tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            try:
                self.client.commit(offsets=tps, asynchronous=False)
            except Exception as exc:  # KafkaException; the new owner redelivers from before
                log.warning("commit on revoke failed error=%s", exc)

    def pause(self, tp: TP, offset: int) -> None:
        """Pause a partition and rewind it to `offset`, fetched again once resumed."""
        part = TopicPartition(tp[0], tp[1], offset)
        self.client.pause([part])
        self.client.seek(part)

    def pause_all(self, tps: list[TP]) -> None:
        """Pause partitions where they are (no rewind): backpressure."""
        if tps:
            self.client.pause([TopicPartition(t, p) for t, p in tps])

    def resume(self, tps: list[TP]) -> None:
        if tps:
            self.client.resume([TopicPartition(t, p) for t, p in tps])

    def rewind(self, starts: dict[TP, int]) -> None:
        for (topic, partition), offset in starts.items():
            self.client.seek(TopicPartition(topic, partition, offset))

    def assignment(self) -> list[TP]:
        return [(tp.topic, tp.partition) for tp in self.client.assignment()]

    def group_metadata(self) -> Any:
        return self.client.consumer_group_metadata()

    def close(self) -> None:
        self.client.close()
