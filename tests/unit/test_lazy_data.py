"""Lazy data decoding: an event's Avro data is decoded when first read, the runtime reads only
the data's head (task id, tenant, submitted_at), and bad data still dead-letters its record
with a clear error, whether the handler read it, caught the error, or never looked."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any
from unittest import mock

import fastavro
import pytest

from conveyor.events.avro import SchemaError, SchemaSet, default_schemas, schema_urn
from conveyor.events.avrohead import HeadReader
from conveyor.events.codec import (
    DecodeError,
    decode_lazy,
    decode_mapped,
    encode_binary,
    header_map,
)
from conveyor.events.lazy import LazyEvent
from conveyor.events.model import Event
from conveyor.runtime.handler import Emit
from tests.eventdata import INFERRED_TOPIC, inferred_data, inferred_event, inferred_record
from tests.kafkafakes import FakeMessage
from tests.unit.test_stage_step import make_runner, moderated, msgs

DLQ = "conveyor.moderation.dlq"
MODERATED_TOPIC = "conveyor.task.moderated"


def lazy_of(event: Event) -> LazyEvent:
    headers, value = encode_binary(event, default_schemas())
    decoded = decode_lazy(header_map(headers), value, default_schemas())
    assert isinstance(decoded, LazyEvent)
    return decoded


def corrupt(task_id: str, *, keep: int, offset: int = 0) -> FakeMessage:
    """A task-inferred record whose data is cut after `keep` bytes."""
    key, value, headers = inferred_record(task_id)
    return FakeMessage(INFERRED_TOPIC, 0, offset, value[:keep], key, list(headers))


def head_len(task_id: str) -> int:
    """How many bytes the head of a task-inferred record takes: cut after them, the head
    reads and the rest of the data does not decode."""
    data = inferred_data(task_id)
    task = default_schemas().encode("task", 1, data["task"])
    return len(task) - 1  # the params map's count (0, one byte) is past the head


def test_data_is_decoded_on_first_read_and_equals_the_eager_decode() -> None:
    event = inferred_event("t-1")
    lazy = lazy_of(event)
    with mock.patch.object(SchemaSet, "decode_urn", wraps=default_schemas().decode_urn) as spy:
        assert "not decoded" in repr(lazy)  # repr never decodes (logs must not)
        assert lazy.head == {
            "task": {"task_id": "t-1", "tenant": "acme", "submitted_at": "2026-11-23T00:00:00Z"}
        }
        assert spy.call_count == 0
        assert lazy.data == event.data
        assert lazy.data is lazy.data  # one decode, the same dict after
        assert spy.call_count == 1
    assert lazy.head is lazy.data and lazy.data_error is None
    assert lazy == lazy_of(event) and lazy.subject == event.subject


@pytest.mark.parametrize(
    "task",
    [
        {},
        {"task_id": "é" * 70, "tenant": "t" * 200, "callback_url": None, "deadline": None},
        {"callback_url": "http://x/" + "y" * 100, "deadline": "2027-01-01T00:00:00Z"},
        {"submitted_at": "", "task_id": "", "priority": "high", "kind": "embed"},
    ],
)
def test_every_schemas_head_equals_the_same_fields_of_the_full_decode(task: dict[str, Any]) -> None:
    schemas = default_schemas()
    data = inferred_data("t-2")
    data["task"].update(task)
    for (name, version), schema in schemas.schemas.items():
        reader = HeadReader.of(schema)
        if name == "task-inferred":
            assert reader is not None
            payload = schemas.encode(name, version, data)
            head = reader.read(payload)
            full = schemas.decode_urn(schema_urn(name, version), payload)[1]["task"]
            assert head["task"] == {k: full[k] for k in ("task_id", "tenant", "submitted_at")}
        elif reader is None:  # every Conveyor schema has its task id first: all have a head
            pytest.fail(f"{name}:{version} has no head reader")


def test_bad_data_raises_a_clear_schema_error_on_every_read() -> None:
    key, value, headers = inferred_record("t-3")
    lazy = decode_lazy(header_map(headers), value[:40], default_schemas())
    for _ in range(2):
        with pytest.raises(SchemaError, match="not valid task-inferred:1 Avro"):
            _ = lazy.data
    assert isinstance(lazy.data_error, SchemaError)
    assert lazy.head is None or lazy.head["task"]["task_id"] == "t-3"


def test_an_unknown_schema_still_fails_when_the_record_arrives() -> None:
    key, value, headers = inferred_record("t-4")
    hmap = header_map(headers)
    hmap["ce_dataschema"] = "urn:conveyor:schema:task-inferred:9"
    with pytest.raises(SchemaError, match="unknown schema"):
        decode_lazy(hmap, value, default_schemas())
    assert decode_mapped(header_map(headers), value, default_schemas()).data == (
        decode_lazy(header_map(headers), value, default_schemas()).data
    )


def test_a_handler_that_never_reads_the_data_never_decodes_it() -> None:
    def relay(event: Event, _ctx: Any) -> Emit:
        return moderated(event)  # builds its output from the subject alone

    runner, consumer, producer = make_runner(handle=relay)
    consumer.queued = msgs(5)
    with mock.patch.object(SchemaSet, "decode_urn", side_effect=AssertionError("decoded")):
        runner.turn()
    outputs = [r for r in producer.records if r.topic == MODERATED_TOPIC]
    assert [r.key for r in outputs] == [f"t0-{i}".encode() for i in range(5)]
    assert consumer.commits[-1][0].offset == 5


def test_bad_data_read_by_the_handler_is_dead_lettered_alone_with_its_error() -> None:
    def read_it(event: Event, _ctx: Any) -> Emit:
        _ = event.data["task"]
        return moderated(event)

    runner, consumer, producer = make_runner(handle=read_it)
    bad = corrupt("t-bad", keep=head_len("t-bad") + 3, offset=2)
    consumer.queued = [*msgs(2), bad, *msgs(2, start=3)]
    runner.turn()
    dead = [r for r in producer.records if r.topic == DLQ]
    assert len(dead) == 1 and dead[0].key == b"t-bad"
    headers = dict(dead[0].headers)
    assert headers["conveyor_error_class"] == b"SchemaError"
    assert b"not valid task-inferred:1 Avro" in headers["conveyor_error_message"]
    assert [r.key for r in producer.records if r.topic == MODERATED_TOPIC] == [
        b"t0-0",
        b"t0-1",
        b"t0-3",
        b"t0-4",
    ]
    assert consumer.commits[-1][0].offset == 5


def test_bad_data_is_dead_lettered_even_when_the_handler_swallows_the_error() -> None:
    def forgiving(event: Event, _ctx: Any) -> Emit:
        with contextlib.suppress(Exception):  # a handler that carries on regardless
            _ = event.data
        return moderated(event)

    runner, consumer, producer = make_runner(handle=forgiving)
    consumer.queued = [corrupt("t-bad", keep=head_len("t-bad") + 3)]
    runner.turn()
    assert [r.topic for r in producer.records if r.topic != "conveyor.task.status"] == [DLQ]


def test_data_bad_from_its_first_byte_is_dead_lettered_though_the_handler_never_reads_it() -> None:
    runner, consumer, producer = make_runner(handle=moderated_from_subject)
    consumer.queued = [corrupt("t-bad", keep=3)]
    runner.turn()
    assert [r.topic for r in producer.records if r.topic != "conveyor.task.status"] == [DLQ]
    status = [r for r in producer.records if r.topic == "conveyor.task.status"]
    assert [r.key for r in status] == [b"t-bad"]  # named by its key, as an undecodable record


def test_bad_data_in_a_batch_of_32_fails_alone_and_the_31_are_emitted() -> None:
    def batch(events: Sequence[Event], _ctx: Any) -> list[Emit]:
        return [Emit("conveyor.task.moderated.v1", {**moderated(e).data}) for e in events if e.data]

    runner, consumer, producer = make_runner(handle_batch=batch)
    records = msgs(32)
    records[13] = corrupt("t-bad", keep=head_len("t-bad") + 3, offset=13)
    consumer.queued = records
    runner.turn()
    assert [r.key for r in producer.records if r.topic == DLQ] == [b"t-bad"]
    assert len([r for r in producer.records if r.topic == MODERATED_TOPIC]) == 31
    assert consumer.commits[-1][0].offset == 32


def moderated_from_subject(event: Event, _ctx: Any) -> Emit:
    return moderated(event)


def test_lazy_and_eager_decodes_give_the_same_event_and_the_same_header_errors() -> None:
    key, value, headers = inferred_record("t-5", tenant="acme", rerun="redrive x")
    hmap = header_map(headers)
    eager, lazy = (
        decode_mapped(hmap, value, default_schemas()),
        decode_lazy(hmap, value, default_schemas()),
    )
    fields = ("id", "type", "source", "subject", "time", "datacontenttype", "dataschema")
    assert [getattr(lazy, f) for f in fields] == [getattr(eager, f) for f in fields]
    assert dict(lazy.extensions) == dict(eager.extensions) and "rerun" in lazy.extensions
    assert lazy.data == eager.data
    for missing in ("ce_id", "ce_source", "ce_type"):
        broken = {k: v for k, v in hmap.items() if k != missing}
        with pytest.raises(DecodeError, match=missing[3:]):
            decode_mapped(broken, value, default_schemas())
        with pytest.raises(DecodeError, match=missing[3:]):
            decode_lazy(broken, value, default_schemas())


def test_a_head_is_refused_where_it_could_differ_from_the_full_decode() -> None:
    def record(*fields: dict[str, Any]) -> dict[str, Any]:
        return {"type": "record", "name": "X", "fields": list(fields)}

    string = {"name": "task_id", "type": "string"}
    stamp = {"name": "tenant", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    listed = {"name": "tags", "type": {"type": "array", "items": "string"}}
    assert HeadReader.of(fastavro.parse_schema(record(string))) is not None
    assert HeadReader.of(fastavro.parse_schema(record(string, stamp))) is None  # a datetime
    assert HeadReader.of(fastavro.parse_schema(record(listed, string))) is None  # behind a list
    # A skipped logical field is only bytes to step over.
    skipped = {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}
    head = HeadReader.of(fastavro.parse_schema(record(skipped, string)))
    assert head is not None
    schema = fastavro.parse_schema(record(skipped, string))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, {"at": 1_700_000_000_000, "task_id": "t-6"})
    assert head.read(buf.getvalue()) == {"task_id": "t-6"}


def test_data_read_as_a_newer_schema_version_is_decoded_in_full_not_headed() -> None:
    schemas = default_schemas()
    urn = schema_urn("task-status", 1)  # read as version 2
    payload = schemas.encode(
        "task-status",
        1,
        {
            "task_id": "t-7",
            "tenant": "acme",
            "status": "failed",
            "stage": "moderation",
            "reason": None,
            "error_class": None,
            "attempt": 1,
            "callback_url": None,
            "time": "2026-11-23T00:00:00Z",
        },
    )
    assert schemas.head_urn(urn, payload) is None
    assert schemas.head_urn(schema_urn("task-status", 2), payload) is not None
