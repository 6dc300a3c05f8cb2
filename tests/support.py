"""Helpers shared by the broker tests: produce tasks, read topics back with deadlines."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, Message, Producer

from conveyor.settings import KafkaSettings
from conveyor.topology import apply_topics


def settings(bootstrap: str, prefix: str) -> KafkaSettings:
    return KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix)


def apply(bootstrap: str, prefix: str, *, partitions: int | None = None) -> None:
    apply_topics(settings(bootstrap, prefix), partitions=partitions)


def task_doc(
    task_id: str,
    *,
    kind: str = "embed",
    text: str = "hello world",
    tenant: str = "acme",
    **extra: Any,
) -> dict[str, Any]:
    data = {"task_id": task_id, "tenant": tenant, "kind": kind, "input": text, **extra}
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/tests/upstream",
        "type": "conveyor.task.submitted.v1",
        "subject": task_id,
        "tenant": tenant,
        "time": "2026-11-23T00:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    }


def produce_structured(bootstrap: str, topic: str, docs: Iterable[Mapping[str, Any]]) -> int:
    """Publish JSON CloudEvents in structured mode, as an ordinary upstream client does."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    n = 0
    for doc in docs:
        producer.produce(
            topic,
            json.dumps(doc).encode(),
            str(doc.get("subject", "")).encode(),
            headers=[("content-type", b"application/cloudevents+json")],
        )
        n += 1
        if n % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return n


def produce_raw(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
) -> None:
    # Room for the oversized records the size guard tests send.
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 4_000_000})
    for key, value, headers in records:
        producer.produce(topic, value, key, headers=headers)
    assert producer.flush(30) == 0


def read_topics(
    bootstrap: str,
    topics: list[str],
    *,
    expect: int,
    timeout_s: float = 60.0,
    settle_s: float = 0.0,
) -> list[Message]:
    """Read from the beginning until `expect` records (then `settle_s` more) or the deadline."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe(topics)
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if settle_until is None and len(out) >= expect:
                settle_until = time.monotonic() + settle_s
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    out.append(msg)
    finally:
        consumer.close()
    return out


def headers_of(msg: Message) -> dict[str, str]:
    return {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}
