"""Avro schemas and the catalog: every event type has a schema; evolution N -> N+1 works."""

from __future__ import annotations

import pytest

from conveyor.events import catalog as catalog_module
from conveyor.events.avro import SchemaError, default_schemas, parse_schema_urn, schema_urn
from conveyor.events.catalog import load_catalog
from conveyor.events.status import StatusData
from conveyor.store.base import TaskStatus

SCHEMAS = default_schemas()


def test_every_catalog_event_names_a_known_schema_version() -> None:
    for spec in load_catalog().events:
        SCHEMAS.get(spec.schema, spec.version)
        assert spec.topics, spec.type


def test_schema_urn_is_written_and_read_in_one_form() -> None:
    for spec in load_catalog().events:
        assert parse_schema_urn(spec.dataschema) == (spec.schema, spec.version)
    assert schema_urn("task-status", 2) == "urn:conveyor:schema:task-status:2"


@pytest.mark.parametrize(
    "urn",
    [
        None,
        "",
        "urn:conveyor:schema:task-status",
        "urn:conveyor:schema:task-status:2:3",
        "urn:conveyor:schema:task-status:2\n",
        "urn:conveyor:schema:task-status:\u0661",  # a digit, but not an ASCII one
        "urn:conveyor:schema:Task-Status:2",
        "urn:other:schema:task-status:2",
    ],
)
def test_anything_but_a_conveyor_schema_urn_is_a_schema_error(urn: str | None) -> None:
    with pytest.raises(SchemaError):
        parse_schema_urn(urn)
    with pytest.raises(SchemaError):
        SCHEMAS.decode_urn(urn or "", b"")


def test_data_written_with_v1_is_read_by_v2_with_defaults() -> None:
    v1 = {
        "task_id": "t1",
        "tenant": "a",
        "kind": "classify",
        "input": "x",
        "template": None,
        "params": {},
        "priority": "normal",
        "callback_url": None,
        "deadline": None,
        "model": None,
    }
    payload = SCHEMAS.encode("task-submitted", 1, v1)
    name, record = SCHEMAS.decode_urn("urn:conveyor:schema:task-submitted:1", payload)
    assert name == "task-submitted"
    assert record["labels"] == []  # the v2 field, from its default
    assert record["input"] == "x"


def test_v2_data_roundtrips() -> None:
    v2 = {
        "task_id": "t1",
        "tenant": "a",
        "kind": "classify",
        "input": "x",
        "template": None,
        "params": {"k": "v"},
        "priority": "low",
        "callback_url": "http://127.0.0.1/cb",
        "deadline": None,
        "model": None,
        "labels": ["a", "b"],
    }
    payload = SCHEMAS.encode("task-submitted", 2, v2)
    assert SCHEMAS.decode_urn("urn:conveyor:schema:task-submitted:2", payload)[1] == v2


def test_data_not_matching_the_schema_is_a_schema_error() -> None:
    with pytest.raises(SchemaError):
        SCHEMAS.encode("task-status", 1, {"task_id": 3})
    with pytest.raises(SchemaError):
        SCHEMAS.get("nope", 1)


def test_internal_schemas_share_the_task_record() -> None:
    task = {
        "task_id": "t",
        "tenant": "a",
        "kind": "embed",
        "priority": "normal",
        "callback_url": None,
        "deadline": None,
        "submitted_at": "2026-01-01T00:00:00Z",
        "model": None,
        "params": {},
    }
    data = {"task": task, "input": "i", "prompt": "p", "token_count": 3, "labels": []}
    payload = SCHEMAS.encode("task-preprocessed", 1, data)
    assert SCHEMAS.decode_urn("urn:conveyor:schema:task-preprocessed:1", payload)[1] == data


def test_status_v1_data_is_read_by_v2_as_not_a_rejected_record() -> None:
    v1 = {
        "task_id": "t1",
        "tenant": "a",
        "status": "failed",
        "stage": "preprocess",
        "reason": "DecodeError: x",
        "error_class": "DecodeError",
        "attempt": 1,
        "callback_url": None,
        "kind": None,
        "time": "2026-11-23T00:00:00Z",
    }
    payload = SCHEMAS.encode("task-status", 1, v1)
    name, record = SCHEMAS.decode_urn("urn:conveyor:schema:task-status:1", payload)
    assert name == "task-status"
    assert record == {**v1, "rejected_record": False}  # the v2 field, from its default
    v2 = {**v1, "rejected_record": True}
    payload = SCHEMAS.encode("task-status", 2, v2)
    assert SCHEMAS.decode_urn("urn:conveyor:schema:task-status:2", payload)[1] == v2


def test_status_data_is_the_newest_task_status_schema_field_for_field() -> None:
    version, schema = SCHEMAS.newest("task-status")
    report = StatusData(
        task_id="t1", tenant="a", status=TaskStatus.EXPIRED, stage="inference", time="2026-01-01"
    )
    record = report.record()
    assert list(record) == [f["name"] for f in schema["fields"]]
    assert record["status"] == "expired" and type(record["status"]) is str
    payload = SCHEMAS.encode("task-status", version, record)
    assert SCHEMAS.decode_urn(schema_urn("task-status", version), payload)[1] == record


def test_the_event_type_names_in_code_are_the_catalog_types() -> None:
    named = {
        value
        for name, value in vars(catalog_module).items()
        if name.endswith("_TYPE") and isinstance(value, str)
    }
    assert named == {spec.type for spec in load_catalog().events}


def test_priority_lanes_are_the_catalog_lane_topics_highest_first() -> None:
    from typing import get_args

    from conveyor.events.catalog import LANES, PREPROCESSED_TYPE
    from conveyor.events.ingress import TaskRequest

    catalog = load_catalog()
    spec = catalog.spec(PREPROCESSED_TYPE)
    assert spec is not None
    assert tuple(catalog.lane_topic(PREPROCESSED_TYPE, lane) for lane in LANES) == spec.topics
    assert get_args(TaskRequest.model_fields["priority"].annotation) == LANES
    with pytest.raises(KeyError):
        catalog.lane_topic(PREPROCESSED_TYPE, "urgent")
    with pytest.raises(KeyError):
        catalog.lane_topic("conveyor.task.inferred.v1", "high")  # one topic: no lanes
