"""The client layer against fakes of the librdkafka clients: delivery tracking, backpressure,
transactions, consumer events, commit results and broker availability."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from conveyor.errors import BrokerError
from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.health import BrokerAvailability
from conveyor.kafka.producer import Acks, KafkaProducer, TransactionAborted
from tests.kafkafakes import FakeConsumerClient, FakeMessage, FakeProducerClient


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_queue_is_waited_out_serving_delivery_reports() -> None:
    client = FakeProducerClient(full=3)
    producer = KafkaProducer(client, delivery_timeout_s=5)
    acks = Acks()
    producer.send("t", b"v", b"k", acks=acks)
    assert len(client.records) == 1 and client.polls == 3  # three waits, then it fit
    producer.wait(acks)
    assert acks.done and acks.sent == 1


def test_a_queue_that_stays_full_past_the_delivery_timeout_is_a_broker_error() -> None:
    client = FakeProducerClient(full=10**9)
    producer = KafkaProducer(client, delivery_timeout_s=0.1)
    with pytest.raises(BrokerError, match="queue stayed full"):
        producer.send("t", b"v", b"k")


def test_a_failed_delivery_is_a_broker_error_when_waited_for() -> None:
    client = FakeProducerClient(fail=KafkaError(KafkaError._MSG_TIMED_OUT))
    producer = KafkaProducer(client, delivery_timeout_s=1)
    acks = Acks()
    producer.send("t", b"v", b"k", acks=acks)
    with pytest.raises(BrokerError, match="delivery failed"):
        producer.wait(acks)


def test_unacknowledged_records_time_out_and_groups_are_tracked_apart() -> None:
    client = FakeProducerClient(hold=True)
    producer = KafkaProducer(client, delivery_timeout_s=0.2)
    first, second = Acks(), Acks()
    producer.send("t", b"1", None, acks=first)
    producer.send("t", b"2", None, acks=second)
    producer.send("t", b"3", None, acks=second)
    assert (first.pending, second.pending) == (1, 2)
    with pytest.raises(BrokerError, match="timed out pending=1"):
        producer.wait(first)
    client.hold = False
    producer.poll()
    assert first.done and second.done


def test_an_acknowledged_group_marks_the_brokers_reachable() -> None:
    clock = Clock()
    availability = BrokerAvailability(10, clock=clock)
    availability.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    producer = KafkaProducer(FakeProducerClient(), delivery_timeout_s=1, availability=availability)
    acks = Acks()
    producer.send("t", b"v", None, acks=acks)
    producer.wait(acks)
    assert availability.down_since is None


def test_every_broker_down_longer_than_the_limit_is_unavailable_until_one_answers() -> None:
    clock = Clock()
    availability = BrokerAvailability(10, clock=clock)
    availability.on_error(KafkaError(KafkaError._TRANSPORT))  # one connection: not down
    assert availability.available()
    availability.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    clock.now += 9
    assert availability.available()  # a short outage is ridden out
    availability.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))  # repeats keep the start
    clock.now += 2
    assert not availability.available()
    availability.on_commit(None, [])
    assert availability.available()


def test_a_failed_commit_is_counted_not_fatal() -> None:
    availability = BrokerAvailability(10)
    availability.on_commit(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), [TopicPartition("t", 0)])
    assert availability.commit_failures == 1 and availability.available()


class ScriptedTransactions(FakeProducerClient):
    """commit_transaction raises the scripted errors first."""

    def __init__(self, errors: list[KafkaError]) -> None:
        super().__init__()
        self.errors = errors

    def commit_transaction(self, timeout: float = -1) -> None:
        if self.errors:
            raise KafkaException(self.errors.pop(0))
        super().commit_transaction(timeout)


def test_a_retriable_commit_is_retried_and_an_abortable_one_aborts() -> None:
    retriable = KafkaError(KafkaError._TIMED_OUT, retriable=True)
    client = ScriptedTransactions([retriable, retriable])
    producer = KafkaProducer(client, delivery_timeout_s=1)
    producer.begin()
    producer.commit()
    assert client.transactions == ["begin", "commit"]

    abortable = KafkaError(KafkaError._FENCED, txn_requires_abort=True)
    client = ScriptedTransactions([abortable])
    producer = KafkaProducer(client, delivery_timeout_s=1)
    producer.begin()
    with pytest.raises(TransactionAborted):
        producer.commit()
    assert client.transactions == ["begin", "abort"]

    fatal = KafkaError(KafkaError._FATAL, fatal=True)
    producer = KafkaProducer(ScriptedTransactions([fatal]), delivery_timeout_s=1)
    with pytest.raises(BrokerError, match="transaction failed"):
        producer.commit()


def eof(topic: str, partition: int, offset: int) -> FakeMessage:
    return FakeMessage(topic, partition, offset, error=KafkaError(KafkaError._PARTITION_EOF))


def test_consumer_events_are_not_records_and_end_of_partition_is_remembered() -> None:
    client = FakeConsumerClient([FakeMessage("t", 0, 4), eof("t", 0, 7), eof("t", 1, 3)])
    consumer = KafkaConsumer(client)
    batch = consumer.poll_batch(10, 0, 0)
    assert [m.offset() for m in batch] == [4]
    assert consumer.ends == {("t", 0): 7, ("t", 1): 3}
    client.queued = [FakeMessage("t", 0, 8)]
    consumer.poll_batch(10, 0, 0)
    assert consumer.ends == {("t", 1): 3}  # a record after the end: no longer at the end


def test_a_fatal_consumer_error_is_a_broker_error() -> None:
    fatal = FakeMessage("t", 0, 0, error=KafkaError(KafkaError._FATAL, fatal=True))
    consumer = KafkaConsumer(FakeConsumerClient([fatal]))
    with pytest.raises(BrokerError, match="consumer failed"):
        consumer.poll_batch(10, 0, 0)


def test_commits_and_pauses_speak_topic_partitions() -> None:
    client = FakeConsumerClient()
    consumer = KafkaConsumer(client)
    consumer.commit({("t", 0): 5, ("t", 1): 9})
    consumer.commit({})  # nothing to commit: no call
    assert [[(p.topic, p.partition, p.offset) for p in c] for c in client.commits] == [
        [("t", 0, 5), ("t", 1, 9)]
    ]
    consumer.pause(("r", 2), 11)
    assert client.paused == [("r", 2)] and client.seeks == [("r", 2, 11)]
    consumer.resume([("r", 2)])
    assert client.paused == []


def test_fakes_satisfy_the_protocols() -> None:
    # mypy checks these assignments; at run time they only prove the fakes construct.
    from conveyor.kafka.protocols import ConsumerClient, Message, ProducerClient

    consumer: ConsumerClient = FakeConsumerClient()
    producer: ProducerClient = FakeProducerClient()
    message: Message = FakeMessage("t", 0, 0)
    checked: list[Any] = [consumer, producer, message]
    assert len(checked) == 3


def test_a_stage_group_is_named_once_for_the_stage_the_gateway_and_replay() -> None:
    from conveyor.services.gateway.settings import GatewaySettings
    from conveyor.settings import StageSettings

    stage = StageSettings(stage="inference", topic_prefix="p.")
    assert stage.group == stage.stage_group("inference") == "p.conveyor.inference"
    assert StageSettings(stage="inference", group_id="mine").group == "mine"
    gateway = GatewaySettings(topic_prefix="p.")
    assert gateway.lag_group == gateway.stage_group("preprocess") == "p.conveyor.preprocess"
