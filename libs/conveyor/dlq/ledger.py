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

from confluent_kafka import Consumer

from conveyor.dlq.reader import META_TIMEOUT_S, read_range, watermarks
from conveyor.kafka.admin import TopicPlan, create_topics
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
    plan = TopicPlan(ledger_topic(settings), 1, dict(LEDGER_CONFIG))
    create_topics(settings, [plan], timeout_s=META_TIMEOUT_S)


def ledger_entry(ref: str, *, target: str, task_id: str, traceparent: str | None) -> bytes:
    note = {
        "target": target,
        "task_id": task_id,
        "traceparent": traceparent,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }
    return json.dumps(note, separators=(",", ":")).encode()
