"""Valid internal events for tests that drive a stage directly: task-inferred records."""

from __future__ import annotations

from typing import Any

from conveyor.events.avro import default_schemas, schema_urn
from conveyor.events.codec import encode_binary
from conveyor.events.model import Event, event_id

INFERRED = "conveyor.task.inferred.v1"
MODERATED = "conveyor.task.moderated.v1"
INFERRED_TOPIC = "conveyor.task.inferred"
MODERATED_TOPIC = "conveyor.task.moderated"
TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


def inferred_data(task_id: str, *, text: str | None = "a harmless answer") -> dict[str, Any]:
    task = {
        "task_id": task_id,
        "tenant": "acme",
        "kind": "generate",
        "priority": "normal",
        "callback_url": "http://127.0.0.1:9/hook",
        "deadline": None,
        "submitted_at": "2026-11-23T00:00:00Z",
        "model": None,
        "params": {},
    }
    return {
        "task": task,
        "input": "say something",
        "model": "tiny",
        "text": text,
        "embedding": None,
        "label": None,
        "label_scores": {},
        "inference_ms": 1.0,
    }


def inferred_event(task_id: str, **extensions: str) -> Event:
    return Event(
        id=event_id(task_id, INFERRED),
        type=INFERRED,
        source="/conveyor/inference",
        subject=task_id,
        data=inferred_data(task_id),
        dataschema=schema_urn("task-inferred", 1),
        time="2026-11-23T00:00:01.000Z",
        extensions={"tenant": "acme", "traceparent": TRACEPARENT, **extensions},
    )


def inferred_record(
    task_id: str, **extensions: str
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a binary-mode task-inferred event, as inference emits it."""
    headers, value = encode_binary(inferred_event(task_id, **extensions), default_schemas())
    return task_id.encode(), value, headers


STORED = "conveyor.task.stored.v1"
STORED_TOPIC = "conveyor.task.stored"


def stored_event(task_id: str, *, tenant: str, callback_url: str, **extensions: str) -> Event:
    """A task-stored event, as writeback emits it for notify."""
    task = {**inferred_data(task_id)["task"], "tenant": tenant, "callback_url": callback_url}
    data = {
        "task": task,
        "status": "completed",
        "verdict": "allow",
        "result": '{"text": "hi"}',
        "error": None,
    }
    return Event(
        id=event_id(task_id, STORED),
        type=STORED,
        source="/conveyor/writeback",
        subject=task_id,
        data=data,
        dataschema=schema_urn("task-stored", 1),
        time="2026-11-23T00:00:02.000Z",
        extensions={"tenant": tenant, "traceparent": TRACEPARENT, **extensions},
    )


def stored_record(
    task_id: str, *, tenant: str, callback_url: str
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a binary-mode task-stored event; tracing headers carried as a
    service with the SDK off carries them (the task's `traceparent`)."""
    event = stored_event(task_id, tenant=tenant, callback_url=callback_url)
    headers, value = encode_binary(event, default_schemas())
    return task_id.encode(), value, [*headers, ("traceparent", TRACEPARENT.encode())]
