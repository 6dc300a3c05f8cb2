"""The broker the tests run against really works: topics, headers, transactions, restarts.

These run against `kafka_bootstrap` (the session's local KRaft broker, or an external cluster);
the restart and detached tests need the local broker itself. Every wait has a deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from conveyor.broker.local import LocalBroker
from conveyor.broker.state import start_detached, status_detached, stop_detached

# Generous for a loaded 2-core CI box; a healthy local broker answers in well under a second.
OP_TIMEOUT_S = 30.0


def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # must outlive the future
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1)],
        operation_timeout=OP_TIMEOUT_S,
    )
    futures[name].result(timeout=OP_TIMEOUT_S)


Headers = list[tuple[str, str | bytes | None]]


def produce(bootstrap: str, topic: str, value: bytes, *, headers: Headers) -> None:
    errors: list[KafkaError | None] = []
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(
        topic, value, key=b"task-1", headers=headers, on_delivery=lambda e, _m: errors.append(e)
    )
    assert producer.flush(OP_TIMEOUT_S) == 0, "delivery not acknowledged before the deadline"
    assert errors == [None]


def consumer(bootstrap: str, group: str, *, read_committed: bool = False) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
    )


def poll_values(c: Consumer, expect: int, *, timeout_s: float = OP_TIMEOUT_S) -> list[Message]:
    """Poll until `expect` records arrived or the deadline passed; consume errors fail the test."""
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        msg = c.poll(0.2)
        if msg is None:
            continue
        assert msg.error() is None, msg.error()
        out.append(msg)
    return out


@pytest.fixture
def topic(kafka_bootstrap: str, topic_prefix: str) -> str:
    name = f"{topic_prefix}broker.check"
    create_topic(kafka_bootstrap, name)
    return name


def test_record_with_key_and_headers_round_trips(kafka_bootstrap: str, topic: str) -> None:
    headers: Headers = [("ce_id", b"abc"), ("content-type", b"application/avro"), ("empty", b"")]
    produce(kafka_bootstrap, topic, b"payload", headers=headers)
    c = consumer(kafka_bootstrap, f"{topic}.g")
    c.subscribe([topic])
    try:
        [msg] = poll_values(c, 1)
    finally:
        c.close()
    assert (msg.key(), msg.value(), msg.headers()) == (b"task-1", b"payload", headers)


def test_local_broker_does_not_auto_create_topics(
    kafka_broker: LocalBroker, topic_prefix: str
) -> None:
    name = f"{topic_prefix}never.created"
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "message.timeout.ms": 2000})
    producer.produce(name, b"x")
    producer.flush(10)  # the record expires after 2 s: its topic does not exist
    metadata = AdminClient({"bootstrap.servers": kafka_broker.bootstrap}).list_topics(timeout=10)
    assert name not in metadata.topics


def test_transaction_commits_output_and_input_offsets_atomically(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    source, sink, group = f"{topic_prefix}tx.in", f"{topic_prefix}tx.out", f"{topic_prefix}tx.g"
    create_topic(kafka_bootstrap, source)
    create_topic(kafka_bootstrap, sink)
    produce(kafka_bootstrap, source, b"input", headers=[])
    worker = consumer(kafka_bootstrap, group, read_committed=True)
    worker.subscribe([source])
    tx = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{group}.tx"})
    try:
        [msg] = poll_values(worker, 1)
        tx.init_transactions(OP_TIMEOUT_S)
        tx.begin_transaction()  # first an aborted one: read_committed readers must never see it
        tx.produce(sink, b"aborted", key=b"task-1")
        tx.abort_transaction(OP_TIMEOUT_S)
        tx.begin_transaction()
        tx.produce(sink, b"committed", key=b"task-1", headers=[("ce_type", b"t.v1")])
        positions = worker.position(worker.assignment())
        tx.send_offsets_to_transaction(positions, worker.consumer_group_metadata(), OP_TIMEOUT_S)
        tx.commit_transaction(OP_TIMEOUT_S)
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None
        committed = worker.committed([TopicPartition(source, partition)], OP_TIMEOUT_S)
    finally:
        worker.close()
    assert committed[0].offset == offset + 1  # the input offset committed with the transaction
    reader = consumer(kafka_bootstrap, f"{group}.reader", read_committed=True)
    reader.subscribe([sink])
    try:
        seen = poll_values(reader, 1)
    finally:
        reader.close()
    assert [m.value() for m in seen] == [b"committed"]


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_restart_keeps_records_and_bootstrap_address(
    kafka_broker: LocalBroker, topic_prefix: str, hard: bool
) -> None:
    bootstrap = kafka_broker.bootstrap
    name = f"{topic_prefix}restart"
    create_topic(bootstrap, name)
    produce(bootstrap, name, b"before-restart", headers=[])
    kafka_broker.restart(hard=hard)
    assert kafka_broker.bootstrap == bootstrap
    assert kafka_broker.ready_seconds is not None
    produce(bootstrap, name, b"after-restart", headers=[])
    c = consumer(bootstrap, f"{name}.g")
    c.subscribe([name])
    try:
        values = [m.value() for m in poll_values(c, 2)]
    finally:
        c.close()
    assert values == [b"before-restart", b"after-restart"]


@pytest.fixture
def state_dir(tmp_path: Path, kafka_broker: LocalBroker) -> Iterator[Path]:
    """A detached broker's state dir, stopped afterwards whatever the test did."""
    del kafka_broker  # requested only so the test skips when the cluster is external
    yield tmp_path / "broker"
    stop_detached(tmp_path / "broker")


def test_detached_broker_start_status_stop_keeps_its_address(state_dir: Path) -> None:
    started = start_detached(state_dir)
    assert started.running and started.bootstrap and not started.already_running
    again = start_detached(state_dir)
    assert again.already_running and again.pid == started.pid
    name = f"t{uuid.uuid4().hex[:8]}.detached"
    create_topic(started.bootstrap, name)
    assert stop_detached(state_dir).was_running
    assert not status_detached(state_dir).running
    restarted = start_detached(state_dir)
    assert restarted.bootstrap == started.bootstrap
    metadata = AdminClient({"bootstrap.servers": restarted.bootstrap}).list_topics(timeout=10)
    assert name in metadata.topics
