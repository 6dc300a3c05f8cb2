"""The redrive ledger: which dead letters were already redriven, so none is redriven twice.

A topic, `conveyor.dlq.redrives` (with the deployment's prefix; one partition; compacted and
deleted after the DLQs' 14 days), holds one record per redriven dead letter, key =
`<dlq topic>:<partition>:<offset>`, value = a small JSON note (target topic, task id, time,
new traceparent). The redrive writes it in the same Kafka transaction as the redriven record,
so a record is redriven and remembered together or not at all.

Why not a consumer group's committed offset: a redrive is filtered (stage, error class, task
id, time), and a committed offset past records the filter skipped would hide them from every
later redrive. The ledger remembers exactly the records that went back, whatever the filters.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from conveyor.dlq.reader import META_TIMEOUT_S, read_range, watermarks
from conveyor.errors import BrokerError
from conveyor.kafka.config import admin as admin_conf
from conveyor.settings import KafkaSettings

LEDGER_TOPIC = "conveyor.dlq.redrives"
# Entries outlive the dead letters they name (14 days) by a day, then go.
LEDGER_CONFIG = {"cleanup.policy": "compact,delete", "retention.ms": str(15 * 24 * 3600 * 1000)}


def ledger_topic(settings: KafkaSettings) -> str:
    return settings.topic(LEDGER_TOPIC)


def redriven_refs(consumer: Consumer, settings: KafkaSettings) -> set[str]:
    """The refs of every dead letter redriven so far (empty when the ledger does not exist)."""
    marks = watermarks(consumer, [ledger_topic(settings)])
    return {(m.key() or b"").decode() for m in read_range(consumer, marks)}


def ensure_ledger(settings: KafkaSettings) -> None:
    """Create the ledger topic if it is missing (idempotent; a concurrent create is fine)."""
    client = AdminClient(admin_conf(settings))
    topic = ledger_topic(settings)
    if topic in client.list_topics(timeout=META_TIMEOUT_S).topics:
        return
    futures = client.create_topics(
        [NewTopic(topic, 1, -1, config=LEDGER_CONFIG)], operation_timeout=META_TIMEOUT_S
    )
    try:
        futures[topic].result(timeout=META_TIMEOUT_S)
    except KafkaException as exc:
        if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise BrokerError(f"creating the redrive ledger {topic} failed: {exc}") from exc


def ledger_entry(ref: str, *, target: str, task_id: str, traceparent: str | None) -> bytes:
    note = {
        "target": target,
        "task_id": task_id,
        "traceparent": traceparent,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    return json.dumps(note, separators=(",", ":")).encode()
