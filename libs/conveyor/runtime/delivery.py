"""Deliver and commit: a batch's records are produced, then its offsets committed once the
broker acknowledged every one of them, batches in the order they were read.

The order is the guarantee: a commit never precedes its outputs' acknowledgement and never
skips an earlier batch, so a crash redelivers (at-least-once) and never loses; deterministic
event ids let consumers deduplicate. The loop does not wait for a batch's acknowledgements
before reading the next one: up to `max_pending` batches wait at once, and each `settle`
commits those acknowledged so far, at most every `commit_interval_s` while records flow (one
commit request per record at a low rate cost the stage and the broker more than the record).
With `exactly_once`, each batch's records and offsets go in one Kafka transaction instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import TopicPartition

from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.producer import Acks, KafkaProducer, TransactionAborted
from conveyor.runtime.hooks import StageHooks
from conveyor.runtime.routing import OutRecord
from conveyor.runtime.step import BatchResult

log = logging.getLogger(__name__)
TP = tuple[str, int]
# Batches produced but not yet acknowledged before the loop waits for the oldest: enough to
# keep the loop reading while the broker acknowledges, few enough to bound what a crash
# redelivers.
MAX_PENDING_BATCHES = 8
FAILPOINT_EXIT = 86


@dataclass(frozen=True, slots=True)
class _Pending:
    """A produced batch waiting for its acknowledgements before its offsets are committed."""

    acks: Acks
    offsets: dict[TP, int]
    outputs: list[OutRecord]


class Failpoint:
    """Fault injection for tests: `CONVEYOR_FAILPOINT=exit-before-commit:N` ends the process
    after the Nth acknowledged batch and before its commit (offsets, or the transaction
    holding them), as a crash there would."""

    def __init__(self, count: int) -> None:
        self.count = count

    @classmethod
    def from_env(cls) -> Failpoint | None:
        name, _, count = os.environ.get("CONVEYOR_FAILPOINT", "").partition(":")
        return cls(int(count or 1)) if name == "exit-before-commit" else None

    def passed(self, producer: KafkaProducer, stage: str) -> None:
        self.count -= 1
        if self.count <= 0:
            producer.flush()  # in a transaction: unacknowledged until the commit
            log.warning("failpoint exit-before-commit reached stage=%s", stage)
            logging.shutdown()
            os._exit(FAILPOINT_EXIT)


class Delivery:
    def __init__(
        self,
        stage: str,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        hooks: StageHooks,
        *,
        exactly_once: bool,
        on_abort: Callable[[BatchResult], None],
        failpoint: Failpoint | None = None,
        commit_interval_s: float = 0.0,
    ) -> None:
        self.stage = stage
        self.consumer = consumer
        self.producer = producer
        self.hooks = hooks
        self.exactly_once = exactly_once
        self.on_abort = on_abort  # an aborted transaction: its input must be read again
        self.failpoint = failpoint
        # A fault-injection run waits for each batch, so "the Nth batch" is exactly one batch.
        self.max_pending = 1 if failpoint is not None else MAX_PENDING_BATCHES
        self.commit_interval_s = 0.0 if failpoint is not None else commit_interval_s
        self._pending: deque[_Pending] = deque()
        self._acked: dict[TP, int] = {}  # acknowledged, not yet committed (commit cadence)
        self._committed_at = float("-inf")

    @property
    def idle(self) -> bool:
        """Nothing produced is waiting for its acknowledgement or commit."""
        return not self._pending and not self._acked

    def deliver(self, result: BatchResult) -> None:
        if self.exactly_once:
            self._transact(result)
            return
        acks = Acks()
        self.producer.send_all(result.outputs, acks)
        self._pending.append(_Pending(acks, result.offsets, result.outputs))
        if len(self._pending) >= self.max_pending:
            self.settle(wait=True)

    def settle(self, *, wait: bool = False, sync: bool = False, idle: bool = True) -> None:
        """Commit the acknowledged batches, oldest first; `wait` for all of them; `sync`
        waits for the commit's answer too (a revoke: the partitions are about to move).
        While records flow (`idle` False) a commit is sent at most every
        `commit_interval_s`: one commit covers every batch acknowledged in between."""
        self.producer.poll(0)  # delivery reports and client events (error_cb)
        offsets = self._acked
        while self._pending and (wait or self._pending[0].acks.done):
            pending = self._pending[0]
            # Emit, wait for the broker's acknowledgement, then commit: a crash before the
            # commit redelivers the batch (at-least-once); committing first could lose it.
            self.producer.wait(pending.acks)
            self._pending.popleft()
            self.hooks.delivered(pending.outputs)
            offsets.update(pending.offsets)
            if self.failpoint is not None:
                self.failpoint.passed(self.producer, self.stage)
        if not offsets:
            return
        now = time.monotonic()
        if not (idle or wait or sync) and now - self._committed_at < self.commit_interval_s:
            return  # the next settle commits these with what it acknowledges
        self._acked, self._committed_at = {}, now
        if sync:
            self.consumer.commit_now(offsets)
        else:
            self.consumer.commit(offsets)

    def _transact(self, result: BatchResult) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in result.offsets.items()]
        try:
            self.producer.begin()
            self.producer.send_all(result.outputs, Acks())  # commit_transaction awaits them
            if offsets:
                self.producer.send_offsets(offsets, self.consumer.group_metadata())
            if self.failpoint is not None:  # leaves the transaction open: the broker aborts it
                self.failpoint.passed(self.producer, self.stage)
            self.producer.commit()
        except TransactionAborted:
            self.on_abort(result)
            return
        self.hooks.delivered(result.outputs)
