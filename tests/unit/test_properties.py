"""Property-based tests: whatever arrives on a topic, decoding and validation fail only with
PermanentError (so the runtime dead-letters it instead of crashing), and valid events round-trip.

Example counts are bounded so the file runs in a few seconds.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conveyor.errors import PermanentError
from conveyor.events.avro import default_schemas, schema_urn
from conveyor.events.codec import decode, encode_binary
from conveyor.events.ingress import TaskRequest, parse_task
from conveyor.events.model import AVRO, JSON, STRUCTURED, Event

SCHEMAS = default_schemas()
FAST = settings(max_examples=100, deadline=None)
CONTENT_TYPES = [AVRO, JSON, STRUCTURED, "text/plain", "application/foo+json", ""]
URNS = [
    schema_urn("task-status", 1),
    schema_urn("task-inferred", 1),
    schema_urn("nope", 1),
    "urn:conveyor:schema:task-status:x",
    "garbage",
]
CE_KEYS = [
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_subject",
    "ce_time",
    "ce_dataschema",
    "ce_attempt",
    "ce_tenant",
    "content-type",
    "traceparent",
]
# Text that survives UTF-8 encoding (no lone surrogates), as header values and Avro strings.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


def decodes_or_permanent(headers: Any, value: bytes | None) -> None:
    with contextlib.suppress(PermanentError):  # dead-lettered; anything else crashes a stage
        decode(headers, value, SCHEMAS)


header_values = st.one_of(
    st.binary(max_size=40),
    TEXT,
    st.none(),
    st.sampled_from([b"1.0", *(c.encode() for c in CONTENT_TYPES), *(u.encode() for u in URNS)]),
)


@FAST
@given(
    st.lists(st.tuples(st.sampled_from(CE_KEYS) | TEXT, header_values), max_size=10),
    st.none() | st.binary(max_size=200),
)
@example(
    [("ce_specversion", b"1.0"), ("content-type", STRUCTURED.encode())], b"[" * 5_000
)  # nesting deeper than the JSON parser's recursion limit
@example(
    [("ce_specversion", b"1.0"), ("ce_id", b"i"), ("ce_source", b"s"), ("ce_type", b"t")],
    b"[" * 5_000,
)
@example(
    [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"i"),
        ("ce_source", b"s"),
        ("ce_type", b"t"),
        ("content-type", AVRO.encode()),
        ("ce_dataschema", URNS[0].encode()),
    ],
    b"\xff" * 64,
)
def test_decoding_arbitrary_headers_and_bytes_fails_only_permanently(
    headers: list[tuple[str, Any]], value: bytes | None
) -> None:
    decodes_or_permanent(headers, value)


structured_docs = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3"]) | JSON_VALUES,
        "id": TEXT | JSON_VALUES,
        "source": TEXT,
        "type": TEXT | JSON_VALUES,
        "subject": TEXT | JSON_VALUES,
        "datacontenttype": st.sampled_from(CONTENT_TYPES),
        "dataschema": st.sampled_from(URNS) | JSON_VALUES,
        "data": JSON_VALUES,
        "data_base64": TEXT
        | JSON_VALUES
        | st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
        "tenant": JSON_VALUES,
    },
)


@FAST
@given(JSON_VALUES | structured_docs)
def test_structured_json_of_any_shape_fails_only_permanently(doc: Any) -> None:
    decodes_or_permanent([("content-type", STRUCTURED.encode())], json.dumps(doc).encode())


@FAST
@given(
    st.dictionaries(
        st.sampled_from(sorted(TaskRequest.model_fields)) | TEXT, JSON_VALUES, max_size=12
    )
    | JSON_VALUES
)
@example(
    {
        "task_id": "t",
        "tenant": "a",
        "kind": "embed",
        "input": "x",
        "deadline": "99999-01-01T00:00:00",
    }
)
@example({1: "non-string key", "task_id": "t"})
def test_ingress_validation_of_arbitrary_data_fails_only_permanently(data: Any) -> None:
    try:
        task = parse_task(data)
    except PermanentError:
        return
    assert isinstance(task, TaskRequest)


ext_names = st.from_regex(r"[a-z][a-z0-9]{0,11}", fullmatch=True).filter(
    lambda n: (
        n
        not in {
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "dataschema",
            "data",
        }
    )
)
NON_EMPTY = TEXT.filter(bool)
INT32 = st.integers(-(2**31), 2**31 - 1)
DOUBLE = st.floats(allow_nan=False)

status_data = st.fixed_dictionaries(
    {
        "task_id": TEXT,
        "tenant": TEXT,
        "status": TEXT,
        "stage": TEXT,
        "reason": st.none() | TEXT,
        "error_class": st.none() | TEXT,
        "attempt": INT32,
        "callback_url": st.none() | TEXT,
        "kind": st.none() | TEXT,
        "time": TEXT,
        "rejected_record": st.booleans(),
    }
)
task_data = st.fixed_dictionaries(
    {
        "task_id": TEXT,
        "tenant": TEXT,
        "kind": TEXT,
        "priority": TEXT,
        "callback_url": st.none() | TEXT,
        "deadline": st.none() | TEXT,
        "submitted_at": TEXT,
        "model": st.none() | TEXT,
        "params": st.dictionaries(TEXT, TEXT, max_size=3),
    }
)
inferred_data = st.fixed_dictionaries(
    {
        "task": task_data,
        "input": TEXT,
        "model": TEXT,
        "text": st.none() | TEXT,
        # Avro `float` is 32-bit: only float32 values survive the round trip unchanged.
        "embedding": st.none() | st.lists(st.floats(width=32, allow_nan=False), max_size=8),
        "label": st.none() | TEXT,
        "label_scores": st.dictionaries(TEXT, DOUBLE, max_size=3),
        "inference_ms": DOUBLE,
    }
)
payloads = st.one_of(
    st.tuples(st.just(AVRO), st.just(schema_urn("task-status", 2)), status_data),
    st.tuples(st.just(AVRO), st.just(schema_urn("task-inferred", 1)), inferred_data),
    st.tuples(st.just(JSON), st.none(), JSON_VALUES),
)


@settings(max_examples=60, deadline=None)
@given(
    NON_EMPTY,
    NON_EMPTY,
    NON_EMPTY,
    st.none() | TEXT,
    st.none() | TEXT,
    payloads,
    st.dictionaries(ext_names, TEXT, max_size=5),
)
def test_binary_encode_then_decode_round_trips_any_valid_event(
    event_id: str,
    event_type: str,
    source: str,
    subject: str | None,
    time: str | None,
    payload: tuple[str, str | None, Any],
    extensions: dict[str, str],
) -> None:
    content_type, dataschema, data = payload
    event = Event(
        id=event_id,
        type=event_type,
        source=source,
        subject=subject,
        data=data,
        datacontenttype=content_type,
        dataschema=dataschema,
        time=time,
        extensions=extensions,
    )
    headers, value = encode_binary(event, SCHEMAS)
    assert decode(headers, value, SCHEMAS) == event


def test_the_recursion_example_really_is_too_deep_for_the_json_parser() -> None:
    # Keeps the @example above honest: without the codec's guard this input raises
    # RecursionError, which the runtime would not dead-letter.
    with pytest.raises(RecursionError):
        json.loads(b"[" * 5_000)
