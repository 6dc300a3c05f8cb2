"""The retry gate: which polled records the stage handles now, which wait on their rung.

A record on a retry rung that is not yet due pauses only its partition and rewinds it to that
record; `resume_due` (called every loop turn) resumes it once due, so the main input keeps
flowing and the loop never sleeps. Records of a partition paused or revoked during this poll
(fetched before that took effect) are dropped: they come again from the committed offset.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from conveyor.kafka.consumer import KafkaConsumer
from conveyor.runtime.ladder import RetryPolicy, rung_of
from conveyor.runtime.step import where

TP = tuple[str, int]


class RetryGate:
    def __init__(
        self, consumer: KafkaConsumer, policy: RetryPolicy, retry_topics: Sequence[str]
    ) -> None:
        self.consumer = consumer
        self.policy = policy
        self.retry_topics = frozenset(retry_topics)
        self.paused: dict[TP, int] = {}  # partition -> due time (ms) of its head record
        self.revoked: set[TP] = set()  # partitions revoked during the current poll

    def admit(self, batch: Sequence[Any]) -> list[Any]:
        """The records to handle now; not-due retries pause their partition."""
        now_ms = int(time.time() * 1000)
        out = []
        for msg in batch:
            topic, partition, offset = where(msg)
            tp = (topic, partition)
            if tp in self.paused or tp in self.revoked:
                continue  # fetched before the pause / revoke took effect; it will come again
            if topic in self.retry_topics:
                due = self.policy.due_ms(rung_of(topic), msg.timestamp()[1])
                if due > now_ms:
                    self.consumer.pause(tp, offset)
                    self.paused[tp] = due
                    continue
            out.append(msg)
        self.revoked.clear()
        return out

    def resume_due(self) -> bool:
        """Resume partitions whose head record is due; True if any was resumed."""
        if not self.paused:
            return False
        now = int(time.time() * 1000)
        due = [tp for tp, at in self.paused.items() if at <= now]
        for tp in due:
            del self.paused[tp]
        self.consumer.resume(due)
        return bool(due)

    def on_revoke(self, partitions: Sequence[TP]) -> list[TP]:
        """Forget revoked partitions; returns those that were paused here (to be resumed:
        librdkafka keeps a pause across revoke and re-assign, with no timer left to lift it)."""
        paused = [tp for tp in partitions if tp in self.paused]
        for tp in partitions:
            self.paused.pop(tp, None)
            self.revoked.add(tp)
        return paused
