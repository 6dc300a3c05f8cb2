"""The typed payload classes match the Avro schemas field for field, and survive the codec.

Every schema the catalog names (each event's current version, and the shared named types) has
a class; its fields are the schema's, in order, with the same optionality (a nullable union is
`X | None`), the same defaults, and a Python type that holds the Avro type. A schema change
without the class fails here.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import pytest

from conveyor.events.avro import default_schemas, schema_urn
from conveyor.events.catalog import load_catalog
from conveyor.events.payloads import (
    PAYLOAD_TYPES,
    Task,
    TaskInferred,
    TaskModerated,
    TaskNotified,
    TaskPreprocessed,
    TaskStored,
    TaskSubmitted,
)
from conveyor.events.status import StatusData
from conveyor.paths import schemas_dir
from conveyor.store.base import TaskStatus
from conveyor.streaming.chunks import Chunk

# Schema name -> class, for what is not an event of the catalog (named types, the stream).
EXTRA = {"task": Task, "task-chunk": Chunk}
_PRIMITIVE: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "int": (int,),
    "long": (int,),
    "double": (float,),
    "float": (float,),
    "boolean": (bool,),
}
TASK = Task(task_id="t-1", tenant="acme", kind="generate", submitted_at="2026-01-01T00:00:00+00:00")


def _schema(name: str, version: int) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((schemas_dir() / f"{name}.v{version}.avsc").read_text())
    return loaded


def _cases() -> list[tuple[str, int, type]]:
    catalog = load_catalog()
    cases = [(spec.schema, spec.version, PAYLOAD_TYPES[spec.type]) for spec in catalog.events]
    for named in catalog.named_types:
        name, version = named.rsplit(".v", 1)
        cases.append((name, int(version), EXTRA[name]))
    cases.append(("task-chunk", 1, EXTRA["task-chunk"]))
    return cases


def test_every_catalog_event_has_a_payload_class() -> None:
    assert {spec.type for spec in load_catalog().events} == set(PAYLOAD_TYPES)
    for event_type, cls in PAYLOAD_TYPES.items():
        assert event_type == cls.EVENT_TYPE
        assert dataclasses.is_dataclass(cls) and hasattr(cls, "__slots__")
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


def _holds(hint: Any, avro: Any) -> bool:
    """Whether the Python type `hint` holds values of the (non-null) Avro type `avro`."""
    if isinstance(avro, str) and avro in _PRIMITIVE:
        if isinstance(hint, type) and issubclass(hint, Enum):
            return avro == "string" and issubclass(hint, str)  # statuses: a StrEnum
        return hint in _PRIMITIVE[avro]
    if avro == "conveyor.Task":
        return hint is Task
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(avro, dict) and avro["type"] == "array":
        return origin in (list, Sequence, tuple) and _holds(args[0], avro["items"])
    if isinstance(avro, dict) and avro["type"] == "map":
        return origin in (dict, Mapping) and args[0] is str and _holds(args[1], avro["values"])
    return False


@pytest.mark.parametrize(
    ("name", "version", "cls"), _cases(), ids=lambda c: getattr(c, "__name__", str(c))
)
def test_payload_class_matches_its_schema(name: str, version: int, cls: type) -> None:
    schema = _schema(name, version)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    assert [f.name for f in fields] == [f["name"] for f in schema["fields"]], cls
    for field, avro in zip(fields, schema["fields"], strict=True):
        kind = avro["type"]
        nullable = isinstance(kind, list) and "null" in kind
        hint = hints[field.name]
        members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        assert (type(None) in members) == nullable, f"{cls.__name__}.{field.name} optionality"
        inner = [m for m in members if m is not type(None)]
        avro_inner = [k for k in kind if k != "null"] if isinstance(kind, list) else [kind]
        assert len(inner) == 1 and len(avro_inner) == 1
        assert _holds(inner[0], avro_inner[0]), f"{cls.__name__}.{field.name}: {hint} vs {kind}"
        has_default = (
            field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        )
        assert has_default == ("default" in avro), f"{cls.__name__}.{field.name} default"
        if "default" in avro:
            value = field.default if field.default is not dataclasses.MISSING else None
            if value is None and field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            assert _plain(value) == avro["default"], f"{cls.__name__}.{field.name} default"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


SAMPLES: list[Any] = [
    TaskSubmitted(
        task_id="t-1",
        tenant="acme",
        kind="classify",
        input="hi",
        labels=("a", "b"),
        params={"seed": "3"},
        callback_url="https://x.example/hook",
    ),
    TaskPreprocessed(task=TASK, input="hi", prompt="Say: hi", token_count=2, labels=("x",)),
    TaskInferred(
        task=Task(
            task_id="t-2",
            tenant="acme",
            kind="embed",
            priority="high",
            deadline="2027-01-01T00:00:00+00:00",
            submitted_at="2026-01-01T00:00:00+00:00",
            model="mini",
            params={"a": "b"},
        ),
        input="hi",
        model="mini",
        embedding=[0.5, -0.25],
        inference_ms=1.5,
    ),
    TaskModerated(
        task=TASK,
        model="gen",
        text="ok",
        verdict="flag",
        scores={"profanity": 0.5},
        reasons=("profanity: 0.50",),
        label="a",
        label_scores={"a": 0.75},
    ),
    TaskStored(task=TASK, status=TaskStatus.COMPLETED, verdict="allow", result='{"text":"ok"}'),
    TaskNotified(
        task_id="t-1",
        tenant="acme",
        status=TaskStatus.BLOCKED,
        channel="webhook",
        http_status=204,
        delivered_at="2026-01-01T00:00:01+00:00",
    ),
    StatusData(
        task_id="t-1",
        tenant="acme",
        status=TaskStatus.RETRYING,
        stage="inference",
        reason="boom",
        error_class="RuntimeError",
        attempt=2,
        kind="generate",
        time="2026-01-01T00:00:02+00:00",
        rejected_record=True,
    ),
]


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: type(p).__name__)
def test_payload_round_trips_through_the_avro_codec(payload: Any) -> None:
    spec = load_catalog().spec(payload.EVENT_TYPE)
    assert spec is not None
    schemas = default_schemas()
    encoded = schemas.encode(spec.schema, spec.version, payload.to_data())
    _, decoded = schemas.decode_urn(schema_urn(spec.schema, spec.version), encoded)
    again = type(payload).from_data(decoded)
    assert _normal(again) == _normal(payload)
    assert again.to_data() == _normal_data(payload.to_data())


def _normal(payload: Any) -> Any:
    """Sequences compared as lists: the codec gives lists where a class was built with tuples."""
    return {
        f.name: _normal(getattr(payload, f.name))
        if dataclasses.is_dataclass(getattr(payload, f.name))
        else _plain(getattr(payload, f.name))
        for f in dataclasses.fields(payload)
    }


def _normal_data(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _normal_data(v) if isinstance(v, dict) else _plain(v) for k, v in data.items()}


def test_statuses_are_the_enum_and_unknown_ones_are_refused() -> None:
    stored = TaskStored.from_data({"task": TASK.to_data(), "status": "failed"})
    assert stored.status is TaskStatus.FAILED
    with pytest.raises(ValueError):
        TaskStored.from_data({"task": TASK.to_data(), "status": "done-ish"})
    old = StatusData.from_data(
        {"task_id": "t", "status": "expired", "stage": "inference", "time": "now"}
    )  # a v1 record: no tenant, no rejected_record
    assert (old.status, old.tenant, old.rejected_record) == (TaskStatus.EXPIRED, "", False)


def test_missing_required_field_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="submitted_at"):
        Task.from_data({"task_id": "t", "tenant": "", "kind": "embed"})
