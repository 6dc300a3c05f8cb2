"""Typed event data: one frozen slotted class per Avro record of the catalog, field for field.

A handler reads `record.data.task.tenant`, not `event.data["task"]["tenant"]`, so
`mypy --strict` checks the business path. Each class mirrors its `schemas/*.avsc` record in
field order, types and optionality (a unit test holds them together: a schema change without
the class fails CI); nested records are nested classes and statuses are `TaskStatus`.

`from_data` takes the decoded Avro mapping (or the lazily decoded one the codec hands out) and
`to_data` gives back what the codec encodes. Both are written out field by field, with no
reflection, because they run once per record on the hot path. Arrays and maps are kept as the
sequences and mappings the decoder made (read-only types, no copy): an embedding of a thousand
floats is passed along, not rebuilt. The status event's class is `StatusData`
(`conveyor.events.status`), the chunk event's `Chunk` (`conveyor.streaming.chunks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from conveyor.events.catalog import (
    INFERRED_TYPE,
    INGRESS_TYPE,
    MODERATED_TYPE,
    NOTIFIED_TYPE,
    PREPROCESSED_TYPE,
    STORED_TYPE,
)
from conveyor.events.status import StatusData
from conveyor.store.base import TaskStatus

_NO_TEXTS: Sequence[str] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Task:
    """`task.v1`: the task context every internal event carries."""

    task_id: str
    tenant: str
    kind: str  # generate | embed | classify
    priority: str = "normal"  # high | normal | low
    callback_url: str | None = None
    deadline: str | None = None  # RFC 3339
    submitted_at: str  # RFC 3339
    model: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> Task:
        return cls(
            task_id=d["task_id"],
            tenant=d["tenant"],
            kind=d["kind"],
            priority=d.get("priority") or "normal",
            callback_url=d.get("callback_url"),
            deadline=d.get("deadline"),
            submitted_at=d["submitted_at"],
            model=d.get("model"),
            params=d.get("params") or {},
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "kind": self.kind,
            "priority": self.priority,
            "callback_url": self.callback_url,
            "deadline": self.deadline,
            "submitted_at": self.submitted_at,
            "model": self.model,
            "params": self.params,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSubmitted:
    """`task-submitted.v2`: what an upstream system asks for (the ingress contract; preprocess
    validates the raw data with pydantic first, since it may come as any JSON)."""

    EVENT_TYPE: ClassVar[str] = INGRESS_TYPE

    task_id: str
    tenant: str
    kind: str
    input: str
    template: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    priority: str = "normal"
    callback_url: str | None = None
    deadline: str | None = None
    model: str | None = None
    labels: Sequence[str] = _NO_TEXTS

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> TaskSubmitted:
        return cls(
            task_id=d["task_id"],
            tenant=d["tenant"],
            kind=d["kind"],
            input=d["input"],
            template=d.get("template"),
            params=d.get("params") or {},
            priority=d.get("priority") or "normal",
            callback_url=d.get("callback_url"),
            deadline=d.get("deadline"),
            model=d.get("model"),
            labels=d.get("labels") or _NO_TEXTS,
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "kind": self.kind,
            "input": self.input,
            "template": self.template,
            "params": self.params,
            "priority": self.priority,
            "callback_url": self.callback_url,
            "deadline": self.deadline,
            "model": self.model,
            "labels": list(self.labels),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPreprocessed:
    """`task-preprocessed.v1`: a valid, normalised, templated task on its priority lane."""

    EVENT_TYPE: ClassVar[str] = PREPROCESSED_TYPE

    task: Task
    input: str  # normalised input text
    prompt: str  # input after the prompt template
    token_count: int
    labels: Sequence[str] = _NO_TEXTS

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> TaskPreprocessed:
        return cls(
            task=Task.from_data(d["task"]),
            input=d["input"],
            prompt=d["prompt"],
            token_count=d["token_count"],
            labels=d.get("labels") or _NO_TEXTS,
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task": self.task.to_data(),
            "input": self.input,
            "prompt": self.prompt,
            "token_count": self.token_count,
            "labels": list(self.labels),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskInferred:
    """`task-inferred.v1`: the model's output for one task (the field its kind produces)."""

    EVENT_TYPE: ClassVar[str] = INFERRED_TYPE

    task: Task
    input: str
    model: str
    text: str | None = None
    embedding: Sequence[float] | None = None
    label: str | None = None
    label_scores: Mapping[str, float] = field(default_factory=dict)
    inference_ms: float = 0.0

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> TaskInferred:
        return cls(
            task=Task.from_data(d["task"]),
            input=d["input"],
            model=d["model"],
            text=d.get("text"),
            embedding=d.get("embedding"),
            label=d.get("label"),
            label_scores=d.get("label_scores") or {},
            inference_ms=d.get("inference_ms") or 0.0,
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task": self.task.to_data(),
            "input": self.input,
            "model": self.model,
            "text": self.text,
            "embedding": self.embedding,
            "label": self.label,
            "label_scores": self.label_scores,
            "inference_ms": self.inference_ms,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskModerated:
    """`task-moderated.v1`: the verdict on a task's input and output (text withheld if blocked)."""

    EVENT_TYPE: ClassVar[str] = MODERATED_TYPE

    task: Task
    model: str
    text: str | None = None
    embedding: Sequence[float] | None = None
    label: str | None = None
    label_scores: Mapping[str, float] = field(default_factory=dict)
    verdict: str  # allow | flag | block
    scores: Mapping[str, float] = field(default_factory=dict)
    reasons: Sequence[str] = _NO_TEXTS

    @property
    def blocked(self) -> bool:
        return self.verdict == "block"

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> TaskModerated:
        return cls(
            task=Task.from_data(d["task"]),
            model=d["model"],
            text=d.get("text"),
            embedding=d.get("embedding"),
            label=d.get("label"),
            label_scores=d.get("label_scores") or {},
            verdict=d["verdict"],
            scores=d.get("scores") or {},
            reasons=d.get("reasons") or _NO_TEXTS,
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task": self.task.to_data(),
            "model": self.model,
            "text": self.text,
            "embedding": self.embedding,
            "label": self.label,
            "label_scores": self.label_scores,
            "verdict": self.verdict,
            "scores": self.scores,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStored:
    """`task-stored.v1`: the task's final record is in the store; notify tells the caller."""

    EVENT_TYPE: ClassVar[str] = STORED_TYPE

    task: Task
    status: TaskStatus  # a terminal one
    verdict: str | None = None
    result: str | None = None  # JSON summary; None when withheld
    error: str | None = None

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> TaskStored:
        return cls(
            task=Task.from_data(d["task"]),
            status=TaskStatus(d["status"]),
            verdict=d.get("verdict"),
            result=d.get("result"),
            error=d.get("error"),
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task": self.task.to_data(),
            "status": self.status.value,
            "verdict": self.verdict,
            "result": self.result,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskNotified:
    """`task-notified.v1`: the caller was told (or there was no one to tell)."""

    EVENT_TYPE: ClassVar[str] = NOTIFIED_TYPE

    task_id: str
    tenant: str
    status: TaskStatus
    channel: str  # webhook | none
    http_status: int | None = None
    delivered_at: str

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> TaskNotified:
        return cls(
            task_id=d["task_id"],
            tenant=d["tenant"],
            status=TaskStatus(d["status"]),
            channel=d["channel"],
            http_status=d.get("http_status"),
            delivered_at=d["delivered_at"],
        )

    def to_data(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "status": self.status.value,
            "channel": self.channel,
            "http_status": self.http_status,
            "delivered_at": self.delivered_at,
        }


class Payload(Protocol):
    """What every payload class is: its event type, and the way to and from the codec."""

    EVENT_TYPE: ClassVar[str]

    def to_data(self) -> dict[str, Any]: ...


# Event type -> its payload class; the catalog test holds every entry to its schema.
PAYLOAD_TYPES: Mapping[str, Any] = {
    cls.EVENT_TYPE: cls
    for cls in (
        TaskSubmitted,
        TaskPreprocessed,
        TaskInferred,
        TaskModerated,
        TaskStored,
        TaskNotified,
        StatusData,
    )
}
