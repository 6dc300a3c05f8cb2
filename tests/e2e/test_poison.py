"""Poison records on every stage's input, interleaved with 500 valid tasks.

Every valid task completes; every poison record lands in the dead-letter topic of the stage
that read it, with its reason; no service restarts and no partition stalls.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conveyor.client import TaskClient
from conveyor.events.avro import default_schemas
from conveyor.events.codec import encode_binary
from conveyor.events.model import Event
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.stack import LocalStack
from conveyor.settings import KafkaSettings
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV
from tests.support import headers_of, produce_raw, read_topics

pytestmark = [pytest.mark.broker, pytest.mark.models]
VALID = 500


def _ce(
    event_type: str, schema: str, data: dict[str, object], task_id: str
) -> tuple[list[tuple[str, bytes]], bytes]:
    event = Event(
        id=f"poison-{task_id}",
        type=event_type,
        source="/tests/poison",
        subject=task_id,
        data=data,
        dataschema=schema,
        time="2026-11-23T00:00:00Z",
    )
    return encode_binary(event, default_schemas())


def poison_records() -> dict[str, list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]]]:
    """topic -> (expected error class, key, value, headers) for each poison kind."""
    status = {
        "task_id": "p-wrong",
        "tenant": "acme",
        "status": "failed",
        "stage": "x",
        "reason": None,
        "error_class": None,
        "attempt": 0,
        "callback_url": None,
        "kind": None,
        "time": "2026-11-23T00:00:00Z",
    }
    wrong_headers, wrong_value = _ce(
        "conveyor.task.moderated.v1", "urn:conveyor:schema:task-status:1", status, "p-wrong"
    )
    unknown_headers, unknown_value = _ce(
        "conveyor.task.status.v1",
        "urn:conveyor:schema:task-status:1",
        {**status, "task_id": "p-unknown"},
        "p-unknown",
    )
    bad_avro = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"p-avro"),
        ("ce_source", b"/t"),
        ("ce_type", b"conveyor.task.inferred.v1"),
        ("ce_subject", b"p-avro"),
        ("content-type", b"application/avro"),
        ("ce_dataschema", b"urn:conveyor:schema:task-inferred:1"),
    ]
    return {
        "conveyor.task.submitted": [
            ("DecodeError", b"p-plain", b"this is not a cloudevent", []),
            ("DecodeError", b"p-random", os.urandom(300), [("x-junk", os.urandom(8))]),
            ("PermanentError", b"p-oversize", b"x" * 1_200_000, []),
        ],
        "conveyor.task.inferred": [("SchemaError", b"p-avro", os.urandom(64), bad_avro)],
        "conveyor.task.moderated": [("SchemaError", b"p-wrong", wrong_value, wrong_headers)],
        "conveyor.task.preprocessed.normal": [
            ("PermanentError", b"p-unknown", unknown_value, unknown_headers)
        ],
    }


# Every stage that reads a topic dead-letters its poison: writeback also reads the stage topics
# (for the timeline), so it dead-letters what it finds there too.
DLQ_OF = {
    "conveyor.task.submitted": ["preprocess"],
    "conveyor.task.inferred": ["moderation", "writeback"],
    "conveyor.task.moderated": ["writeback"],
    "conveyor.task.preprocessed.normal": ["inference", "writeback"],
}


def test_poison_records_go_to_the_right_dlq_while_valid_tasks_complete(
    kafka_bootstrap: str, topic_prefix: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'poison.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        **WEBHOOK_ENV,
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
    }
    stack = LocalStack(tmp_path, env)
    stack.apply_topics()
    stack.start()
    poison = poison_records()
    try:
        client = TaskClient(
            KafkaSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
        )
        tasks = [
            {
                "task_id": f"ok-{i:04d}",
                "tenant": "acme",
                "kind": "embed",
                "input": f"valid task {i}",
                "callback_url": receiver.url,
            }
            for i in range(VALID)
        ]
        for chunk in range(0, VALID, 100):  # poison between every chunk of valid tasks
            client.submit_many(tasks[chunk : chunk + 100])
            for topic, records in poison.items():
                produce_raw(
                    kafka_bootstrap, topic_prefix + topic, [(k, v, h) for _, k, v, h in records]
                )
        store = open_store(store_url)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if store.count_by_status()["completed"] >= VALID:
                break
            time.sleep(0.5)
        counts = store.count_by_status()
        store.close()
        starts = {name: p.starts for name, p in stack.procs.items()}
        alive = {name: p.running() and p.healthy() for name, p in stack.procs.items()}
    finally:
        stack.stop()
    assert counts["completed"] == VALID, counts
    assert all(n == 1 for n in starts.values()), starts  # no service restarted
    assert all(alive.values()), alive
    for stage in ("preprocess", "inference", "moderation", "writeback"):
        mine = [
            (topic, r)
            for topic, records in poison.items()
            if stage in DLQ_OF[topic]
            for r in records
        ]
        expected = len(mine) * (VALID // 100)
        dlq = read_topics(
            kafka_bootstrap,
            [f"{topic_prefix}conveyor.{stage}.dlq"],
            expect=expected,
            timeout_s=30,
            settle_s=0.5,
        )
        assert len(dlq) == expected, (stage, len(dlq))
        by_key: dict[bytes | None, list[object]] = {}
        for msg in dlq:
            by_key.setdefault(msg.key(), []).append(msg)
        for topic, (error_class, key, value, _) in mine:
            found = by_key[key]
            assert len(found) == VALID // 100
            for msg in found:
                h = headers_of(msg)  # type: ignore[arg-type]
                assert msg.value() == value  # type: ignore[attr-defined]
                assert h["conveyor_error_stage"] == stage
                assert h["conveyor_original_topic"] == topic_prefix + topic
                assert h["conveyor_error_message"]
                if stage == DLQ_OF[topic][0]:
                    assert h["conveyor_error_class"] == error_class, (key, h)
