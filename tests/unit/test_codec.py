"""CloudEvents codec: binary mode out, binary + structured in, conformance with the SDK."""

from __future__ import annotations

import base64
import json
from datetime import datetime

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent

from conveyor.events.avro import SchemaError, default_schemas
from conveyor.events.codec import DecodeError, decode, decode_ingress, encode_binary, header_map
from conveyor.events.model import AVRO, Event, event_id

SCHEMAS = default_schemas()
STATUS_URN = "urn:conveyor:schema:task-status:2"


def status_event(**ext: str) -> Event:
    data = {
        "task_id": "t-1",
        "tenant": "acme",
        "status": "failed",
        "stage": "inference",
        "reason": "boom",
        "error_class": "PermanentError",
        "attempt": 1,
        "callback_url": None,
        "kind": "generate",
        "time": "2026-11-23T00:00:00Z",
        "rejected_record": False,
    }
    return Event(
        id=event_id("t-1", "conveyor.task.status.v1"),
        type="conveyor.task.status.v1",
        source="/conveyor/inference",
        subject="t-1",
        data=data,
        dataschema=STATUS_URN,
        time="2026-11-23T00:00:00.000Z",
        extensions={"tenant": "acme", "priority": "high", **ext},
    )


def test_binary_roundtrip_keeps_attributes_extensions_and_data() -> None:
    event = status_event(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    headers, value = encode_binary(event, SCHEMAS)
    back = decode(headers, value, SCHEMAS)
    assert back == event


def test_binary_headers_match_the_cloudevents_sdk() -> None:
    event = status_event()
    headers, value = encode_binary(event, SCHEMAS)
    sdk_event = SdkEvent(
        attributes={
            "id": event.id,
            "source": event.source,
            "type": event.type,
            "specversion": "1.0",
            "subject": event.subject,
            "time": datetime.fromisoformat(event.time or ""),
            "datacontenttype": AVRO,
            "dataschema": STATUS_URN,
            **event.extensions,
        },
        data=value,
    )
    sdk = ce_kafka.to_binary(sdk_event, JSONFormat())
    ours = dict(headers)
    assert set(ours) == set(sdk.headers)
    for key, raw in sdk.headers.items():
        if key == "ce_time":  # the SDK renders times with its own precision and offset
            assert datetime.fromisoformat(ours[key].decode()) == datetime.fromisoformat(
                raw.decode()
            )
            continue
        assert ours[key] == raw, key
    assert sdk.value == value


def test_sdk_reads_what_conveyor_writes() -> None:
    headers, value = encode_binary(status_event(), SCHEMAS)
    message = ce_kafka.KafkaMessage(headers=dict(headers), key=b"t-1", value=value)
    sdk_event = ce_kafka.from_binary(message, JSONFormat())
    assert sdk_event.get_id() == status_event().id
    assert sdk_event.get_extension("tenant") == "acme"


def test_structured_json_event_from_an_ordinary_client_is_read() -> None:
    doc = {
        "specversion": "1.0",
        "id": "e1",
        "source": "/upstream",
        "type": "conveyor.task.submitted.v1",
        "subject": "t-9",
        "datacontenttype": "application/json",
        "tenant": "acme",
        "data": {"task_id": "t-9", "tenant": "acme", "kind": "embed", "input": "hi"},
    }
    event = decode(
        [("content-type", b"application/cloudevents+json")], json.dumps(doc).encode(), SCHEMAS
    )
    assert event.subject == "t-9" and event.ext("tenant") == "acme"
    assert event.data["input"] == "hi"


def test_structured_avro_data_base64_is_decoded() -> None:
    _, value = encode_binary(status_event(), SCHEMAS)
    doc = {
        "specversion": "1.0",
        "id": "e1",
        "source": "/x",
        "type": "conveyor.task.status.v1",
        "datacontenttype": AVRO,
        "dataschema": STATUS_URN,
        "data_base64": base64.b64encode(value).decode(),
    }
    event = decode(
        [("content-type", b"application/cloudevents+json")], json.dumps(doc).encode(), SCHEMAS
    )
    assert event.data["status"] == "failed"


@pytest.mark.parametrize(
    ("headers", "value", "error"),
    [
        ([], b"plain text", DecodeError),
        ([("content-type", b"application/cloudevents+json")], b"{not json", DecodeError),
        ([("content-type", b"application/cloudevents+json")], b"[1,2]", DecodeError),
        ([("ce_specversion", b"1.0"), ("ce_id", b"x"), ("ce_source", b"/s")], b"{}", DecodeError),
        (
            [("ce_specversion", b"0.3"), ("ce_id", b"x"), ("ce_source", b"/s"), ("ce_type", b"t")],
            b"{}",
            DecodeError,
        ),
        (
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"x"),
                ("ce_source", b"/s"),
                ("ce_type", b"t"),
                ("content-type", b"application/avro"),
                ("ce_dataschema", STATUS_URN.encode()),
            ],
            b"\xff\xfe\x00garbage",
            SchemaError,
        ),
        (
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"x"),
                ("ce_source", b"/s"),
                ("ce_type", b"t"),
                ("content-type", b"application/avro"),
                ("ce_dataschema", b"urn:other:1"),
            ],
            b"",
            SchemaError,
        ),
        ([("ce_specversion", b"\xff")], b"", DecodeError),
        (
            [
                ("ce_specversion", b"1.0"),
                ("ce_id", b"x"),
                ("ce_source", b"/s"),
                ("ce_type", b"t"),
                ("content-type", b"text/plain"),
            ],
            b"hello",
            DecodeError,
        ),
    ],
)
def test_unreadable_records_raise_permanent_errors(
    headers: list[tuple[str, bytes]], value: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        decode(headers, value, SCHEMAS)


def test_event_ids_are_deterministic_per_task_and_type() -> None:
    assert event_id("t", "a") == event_id("t", "a")
    assert event_id("t", "a") != event_id("t", "b")
    assert event_id("t", "a") != event_id("u", "a")
    assert event_id("t", "a", "x") != event_id("t", "a")
    # A task is (tenant, task id): the tenant is part of the id, and cannot be smuggled in
    # through the task id or another tenant name.
    assert event_id("t", "a", tenant="acme") != event_id("t", "a", tenant="globex")
    assert event_id("t", "a", tenant="acme") != event_id("t", "a")
    assert event_id("t", "a", tenant="acme") != event_id("acme\x1dt", "a")
    assert event_id("b\x1dt", "a", tenant="a") != event_id("t", "a", tenant="a\x1db")


def test_event_id_is_the_rfc4122_uuid5_of_task_type_and_discriminator() -> None:
    import uuid

    from conveyor.events.model import _ID_NAMESPACE

    for task_id in ("t", "task-1", "ünïcode", "x" * 200):
        expected = uuid.uuid5(_ID_NAMESPACE, f"{task_id}\x1ftype\x1fd")
        assert event_id(task_id, "type", "d") == str(expected)


def test_ingress_takes_a_plain_json_task_as_a_submitted_event_named_by_its_coordinates() -> None:
    body = {"task_id": "t-1", "tenant": "acme", "kind": "embed", "input": "hi"}
    for headers in ([], [("content-type", b"application/json")]):
        event = decode_ingress(header_map(headers), json.dumps(body).encode(), SCHEMAS, at="in:0:7")
        assert (event.type, event.id, event.subject, event.data) == (
            "conveyor.task.submitted.v1",
            "in:0:7",
            None,
            body,
        )
    with pytest.raises(DecodeError, match="neither a CloudEvent nor a JSON object"):
        decode_ingress({}, b"this is not a cloudevent", SCHEMAS, at="in:0:8")
    with pytest.raises(DecodeError, match="neither a CloudEvent nor a JSON object"):
        decode_ingress({}, b"[1, 2]", SCHEMAS, at="in:0:9")
    with pytest.raises(DecodeError, match="no ce_specversion"):  # a broken CloudEvent stays one
        decode_ingress({"ce_id": "x"}, json.dumps(body).encode(), SCHEMAS, at="in:0:10")
    with pytest.raises(DecodeError, match="not JSON"):
        structured = {"content-type": "application/cloudevents+json"}
        decode_ingress(structured, b"{nope", SCHEMAS, at="in:0:11")
