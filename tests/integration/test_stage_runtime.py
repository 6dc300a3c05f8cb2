"""The stage runtime against the real broker, with the preprocess service as its own process."""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.events.avro import default_schemas
from conveyor.events.codec import decode
from conveyor.events.model import event_id
from conveyor.local.process import ServiceProcess
from tests.support import apply, headers_of, produce_raw, produce_structured, read_topics, task_doc

pytestmark = pytest.mark.broker
LANES = [
    "conveyor.task.preprocessed.high",
    "conveyor.task.preprocessed.normal",
    "conveyor.task.preprocessed.low",
]
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$")
PREPROCESSED = "conveyor.task.preprocessed.v1"


@pytest.fixture
def stage_env(kafka_bootstrap: str, topic_prefix: str) -> dict[str, str]:
    apply(kafka_bootstrap, topic_prefix)
    return {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_TOKENIZERS": "false",
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
    }


@pytest.fixture
def preprocess(stage_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("preprocess", stage_env, tmp_path)
    yield proc
    proc.stop()


def test_thousand_events_in_thousand_valid_cloudevents_out(
    kafka_bootstrap: str, topic_prefix: str, preprocess: ServiceProcess
) -> None:
    parent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    docs = []
    for i in range(1000):
        doc = task_doc(f"task-{i:04d}", priority=["high", "normal", "low"][i % 3])
        if i % 2 == 0:
            doc["traceparent"] = parent  # the CloudEvents distributed-tracing extension
        docs.append(doc)
    produce_structured(kafka_bootstrap, topic_prefix + "conveyor.task.submitted", docs)
    preprocess.start()
    preprocess.wait_ready()
    out = read_topics(
        kafka_bootstrap, [topic_prefix + t for t in LANES], expect=1000, timeout_s=90, settle_s=1.0
    )
    assert len(out) == 1000, preprocess.tail()
    schemas = default_schemas()
    seen = set()
    for msg in out:
        event = decode(msg.headers(), msg.value(), schemas)
        task_id = msg.key().decode()
        i = int(task_id.split("-")[1])
        assert event.subject == task_id
        assert event.type == PREPROCESSED
        assert event.source == "/conveyor/preprocess"
        assert event.id == event_id(task_id, PREPROCESSED, tenant="acme")
        assert event.datacontenttype == "application/avro"
        assert event.dataschema == "urn:conveyor:schema:task-preprocessed:1"
        assert event.ext("tenant") == "acme"
        assert msg.topic() == topic_prefix + LANES[i % 3]
        assert event.data["task"]["task_id"] == task_id
        headers = headers_of(msg)
        if i % 2 == 0:
            assert event.ext("traceparent") == parent
            assert TRACEPARENT.match(headers["traceparent"])
            assert headers["traceparent"].split("-")[1] == "ab" * 16  # the same trace
        seen.add(task_id)
    assert len(seen) == 1000


def test_crash_between_produce_and_commit_redelivers_instead_of_losing(
    kafka_bootstrap: str, topic_prefix: str, stage_env: dict[str, str], tmp_path: Path
) -> None:
    docs = [task_doc(f"crash-{i:03d}") for i in range(300)]
    produce_structured(kafka_bootstrap, topic_prefix + "conveyor.task.submitted", docs)
    env = {**stage_env, "CONVEYOR_BATCH_MAX": "40", "CONVEYOR_FAILPOINT": "exit-before-commit:1"}
    crashing = ServiceProcess("preprocess", env, tmp_path)
    crashing.start()
    assert crashing.proc is not None
    assert crashing.proc.wait(90) == 86, crashing.tail()  # died after the acks, before commit
    first = read_topics(
        kafka_bootstrap, [topic_prefix + t for t in LANES], expect=1, timeout_s=30, settle_s=1.0
    )
    assert 0 < len(first) <= 40  # that batch's outputs were acknowledged

    healthy = ServiceProcess(
        "preprocess", {**stage_env, "CONVEYOR_BATCH_MAX": "40"}, tmp_path, index=1
    )
    healthy.start()
    try:
        healthy.wait_ready()
        expected = 300 + len(first)
        out = read_topics(
            kafka_bootstrap,
            [topic_prefix + t for t in LANES],
            expect=expected,
            timeout_s=90,
            settle_s=1.0,
        )
    finally:
        healthy.stop()
    counts = collections.Counter(m.key().decode() for m in out)
    assert set(counts) == {d["subject"] for d in docs}  # nothing lost
    redelivered = {k for k, n in counts.items() if n == 2}
    assert redelivered == {m.key().decode() for m in first}  # the uncommitted batch came again
    ids = collections.defaultdict(set)
    for msg in out:
        ids[msg.key().decode()].add(headers_of(msg)["ce_id"])
    assert all(len(v) == 1 for v in ids.values())  # a redelivery has the same event id


def test_bad_records_are_dead_lettered_with_reason_and_status_without_stalling(
    kafka_bootstrap: str, topic_prefix: str, preprocess: ServiceProcess
) -> None:
    ingress = topic_prefix + "conveyor.task.submitted"
    structured = [("content-type", b"application/cloudevents+json")]
    bad_type = task_doc("bad-type")
    bad_type["type"] = "conveyor.task.unknown.v1"
    invalid = task_doc("bad-schema")
    del invalid["data"]["input"]
    empty = task_doc("bad-empty", text="   \n\t ")
    poison = [
        (b"bad-plain", b"not a cloudevent at all", []),
        (b"bad-json", b"{broken json", structured),
        (b"bad-type", __import__("json").dumps(bad_type).encode(), structured),
        (b"bad-schema", __import__("json").dumps(invalid).encode(), structured),
        (b"bad-empty", __import__("json").dumps(empty).encode(), structured),
        (None, bytes(range(256)), [("ce_specversion", b"1.0")]),
    ]
    good = [task_doc(f"good-{i}") for i in range(20)]
    produce_structured(kafka_bootstrap, ingress, good[:10])
    produce_raw(kafka_bootstrap, ingress, poison)
    produce_structured(kafka_bootstrap, ingress, good[10:])
    preprocess.start()
    preprocess.wait_ready()

    out = read_topics(
        kafka_bootstrap, [topic_prefix + t for t in LANES], expect=20, timeout_s=60, settle_s=0.5
    )
    assert sorted(m.key().decode() for m in out) == sorted(d["subject"] for d in good)
    dlq = read_topics(
        kafka_bootstrap,
        [topic_prefix + "conveyor.preprocess.dlq"],
        expect=6,
        timeout_s=30,
        settle_s=0.5,
    )
    assert len(dlq) == 6
    by_key = {(m.key() or b"").decode(): m for m in dlq}
    for key, value, _ in poison:
        msg = by_key[(key or b"").decode()]
        assert msg.value() == value  # the original bytes, untouched
        h = headers_of(msg)
        assert h["conveyor_error_stage"] == "preprocess"
        assert h["conveyor_error_class"] in (
            "DecodeError",
            "PermanentError",
            "SchemaError",
            "InvalidTaskError",
        )
        assert h["conveyor_error_message"]
        assert h["conveyor_original_topic"] == ingress
        assert h["conveyor_error_attempts"] == "1"
    assert "input" in headers_of(by_key["bad-schema"])["conveyor_error_message"]
    assert "empty" in headers_of(by_key["bad-empty"])["conveyor_error_message"]
    status = read_topics(
        kafka_bootstrap,
        [topic_prefix + "conveyor.task.status"],
        expect=5,
        timeout_s=30,
        settle_s=0.5,
    )
    schemas = default_schemas()
    failed = {decode(m.headers(), m.value(), schemas).data["task_id"]: m for m in status}
    assert set(failed) == {"bad-plain", "bad-json", "bad-type", "bad-schema", "bad-empty"}
    for msg in status:
        assert decode(msg.headers(), msg.value(), schemas).data["status"] == "failed"
    assert preprocess.running() and preprocess.healthy()
