"""The admission probe on the real broker: per-lane backlog and the inference group's served
total from committed offsets, read without joining the groups."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from conveyor.admission import INGRESS, LANES, KafkaBacklog
from conveyor.events.catalog import INGRESS_TOPIC
from tests.support import apply, produce_raw


def test_the_probe_reads_each_lanes_backlog_and_what_inference_served(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    apply(kafka_bootstrap, topic_prefix, partitions=1)
    lane = topic_prefix + "conveyor.task.preprocessed."
    produce_raw(kafka_bootstrap, lane + "normal", [(b"k", b"v", []) for _ in range(10)])
    produce_raw(kafka_bootstrap, lane + "low", [(b"k", b"v", []) for _ in range(3)])
    produce_raw(kafka_bootstrap, topic_prefix + INGRESS_TOPIC, [(b"k", b"v", []) for _ in range(2)])
    group = f"{topic_prefix}conveyor.inference"
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    committer.commit(offsets=[TopicPartition(lane + "normal", 0, 4)], asynchronous=False)
    committer.close()
    probe = KafkaBacklog(
        {"bootstrap.servers": kafka_bootstrap},
        ingress=(f"{topic_prefix}conveyor.preprocess", topic_prefix + INGRESS_TOPIC),
        inference_group=group,
        lanes={name: lane + name for name in LANES},
    )
    try:
        snapshot = probe()
    finally:
        probe.close()
    assert snapshot.waiting == {INGRESS: 2, "high": 0, "normal": 6, "low": 3}
    assert snapshot.served == 4
