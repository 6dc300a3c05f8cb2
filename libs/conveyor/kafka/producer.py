"""The one producer behaviour of Conveyor: delivery tracking, backpressure, transactions.

Every record Conveyor produces (stage outputs, `TaskClient`, redrive, replay) goes through
`KafkaProducer`. It owns:
- delivery tracking: records are sent under an `Acks` (one per batch, or the producer's own),
  which counts the broker's acknowledgements and keeps the errors;
- backpressure: a full local queue (`BufferError`) is waited out, serving delivery reports,
  until `delivery_timeout_s`, then `BrokerError`;
- transactions: begin, offsets, commit (retried while the error is retriable), abort;
- broker availability: acknowledged deliveries mark the cluster reachable (`BrokerAvailability`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from conveyor.errors import BrokerError
from conveyor.kafka.health import BrokerAvailability
from conveyor.kafka.protocols import DeliveryCallback, ProducerClient, RawHeaders

log = logging.getLogger(__name__)
# How long one wait for a full queue to drain serves delivery reports before trying again.
_DRAIN_POLL_S = 0.05
# commit_transaction is retried this often on retriable errors before the stage gives up.
_COMMIT_TRIES = 5


class Record(Protocol):
    """What can be produced: `routing.OutRecord` and anything shaped like it."""

    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes: ...
    @property
    def headers(self) -> list[tuple[str, bytes]]: ...


class Acks:
    """The delivery reports of a group of records: how many are pending, which failed."""

    __slots__ = ("pending", "sent", "errors", "callback")

    def __init__(self) -> None:
        self.pending = 0
        self.sent = 0
        self.errors: list[KafkaError] = []
        self.callback: DeliveryCallback = self._on_delivery  # bound once, used per record

    @property
    def done(self) -> bool:
        return self.pending == 0

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        self.pending -= 1
        if err is not None:
            self.errors.append(err)

    def check(self) -> None:
        """Raise `BrokerError` if a record of the group was not delivered (once per error)."""
        if self.errors:
            errors, self.errors = self.errors, []
            raise BrokerError(f"delivery failed errors={errors[:3]}")


class TransactionAborted(BrokerError):
    """The transaction was aborted (the broker asked for it): its input must be read again."""


class KafkaProducer:
    def __init__(
        self,
        client: ProducerClient,
        *,
        delivery_timeout_s: float,
        availability: BrokerAvailability | None = None,
    ) -> None:
        self.client = client
        self.delivery_timeout_s = delivery_timeout_s
        self.availability = availability
        self.acks = Acks()  # records sent without a group of their own

    @classmethod
    def open(
        cls,
        conf: dict[str, Any],
        *,
        delivery_timeout_s: float,
        availability: BrokerAvailability | None = None,
    ) -> KafkaProducer:
        """A wrapper around a new confluent-kafka producer built from `conf`."""
        from confluent_kafka import Producer

        if availability is not None:
            conf = {**conf, **availability.callbacks()}
        return cls(Producer(conf), delivery_timeout_s=delivery_timeout_s, availability=availability)

    # -- sending ---------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: RawHeaders | None = None,
        *,
        partition: int = -1,
        acks: Acks | None = None,
        on_delivery: DeliveryCallback | None = None,
        queue_wait_s: float | None = None,
    ) -> None:
        """Queue one record; `on_delivery` replaces the group's tracking for it. A full local
        queue is waited out for `queue_wait_s` (default: the delivery timeout)."""
        group = acks or self.acks
        callback = on_delivery or group.callback
        deadline = 0.0
        while True:
            try:
                self.client.produce(
                    topic, value, key, partition=partition, on_delivery=callback, headers=headers
                )
                break
            except BufferError:
                # The local queue is full: serve delivery reports until it drains.
                now = time.monotonic()
                wait = self.delivery_timeout_s if queue_wait_s is None else queue_wait_s
                deadline = deadline or now + wait
                if now >= deadline:
                    raise BrokerError("producer queue stayed full") from None
                self.client.poll(min(_DRAIN_POLL_S, deadline - now))
            except KafkaException as exc:  # e.g. fenced inside a transaction
                raise BrokerError(f"produce failed: {exc}") from exc
        if on_delivery is None:
            group.pending += 1
            group.sent += 1

    def send_all(self, records: Iterable[Record], acks: Acks | None = None) -> None:
        group = acks or self.acks
        produce, callback = self.client.produce, group.callback
        for record in records:
            # librdkafka's stubs want str | bytes | None header values; bytes are that.
            headers: Any = record.headers
            try:  # the common case, inline: room in the local queue
                produce(
                    record.topic, record.value, record.key, on_delivery=callback, headers=headers
                )
            except BufferError:  # full: `send` waits it out (or raises BrokerError)
                self.send(record.topic, record.value, record.key, headers, acks=group)
                continue
            except KafkaException as exc:
                raise BrokerError(f"produce failed: {exc}") from exc
            group.pending += 1
            group.sent += 1

    def poll(self, timeout_s: float = 0) -> None:
        """Serve delivery reports and client events (`error_cb`)."""
        self.client.poll(timeout_s)

    def wait(self, acks: Acks | None = None, timeout_s: float | None = None) -> None:
        """Block until every record of `acks` is acknowledged; `BrokerError` if one failed or
        the broker did not answer within `timeout_s` (default: the delivery timeout)."""
        group = acks or self.acks
        deadline = time.monotonic() + (timeout_s or self.delivery_timeout_s)
        while not group.done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"delivery timed out pending={group.pending}")
            self.client.poll(min(left, 0.1))
        group.check()
        if group.sent and self.availability is not None:
            self.availability.up()

    def flush(self, timeout_s: float | None = None) -> int:
        """Wait for everything queued; returns how many records are still not acknowledged."""
        left = self.client.flush(timeout_s or self.delivery_timeout_s)
        if not left and self.availability is not None and self.acks.sent:
            self.availability.up()
        return left

    # -- transactions ----------------------------------------------------------------------

    def init_transactions(self) -> None:
        self.client.init_transactions(self.delivery_timeout_s)

    def begin(self) -> None:
        self._transactional(self.client.begin_transaction)

    def send_offsets(self, offsets: list[TopicPartition], group_metadata: Any) -> None:
        self._transactional(
            self.client.send_offsets_to_transaction,
            offsets,
            group_metadata,
            self.delivery_timeout_s,
        )

    def commit(self) -> None:
        """Commit the open transaction, retrying retriable errors a few times."""
        for _ in range(_COMMIT_TRIES):
            try:
                self._transactional(self.client.commit_transaction, self.delivery_timeout_s)
                if self.availability is not None:
                    self.availability.up()
                return
            except _Retriable:
                continue
        raise BrokerError("commit_transaction kept failing with retriable errors")

    def abort(self) -> None:
        try:
            self.client.abort_transaction(self.delivery_timeout_s)
        except KafkaException as exc:  # fenced or fatal: nothing was committed either way
            raise BrokerError(f"transaction abort failed: {exc}") from exc

    def _transactional(self, call: Any, *args: Any) -> None:
        """Run a transactional call; abortable errors abort and raise `TransactionAborted`."""
        try:
            call(*args)
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if error.txn_requires_abort():
                log.warning("transaction aborted error=%s", error)
                self.abort()
                raise TransactionAborted(f"transaction aborted: {error}") from exc
            if error.retriable() and call == self.client.commit_transaction:
                raise _Retriable() from exc
            raise BrokerError(f"transaction failed: {error}") from exc


class _Retriable(Exception):
    """A retriable commit_transaction error (internal to `KafkaProducer.commit`)."""
