"""The ingress contract: what a submitted task may contain, checked with pydantic at the edge.

Preprocess applies it to every `conveyor.task.submitted.v1` event (JSON or Avro); the gateway
and `conveyor submit` apply the same model before sending, so callers get the error at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from conveyor.errors import PermanentError


class TaskRequest(BaseModel):
    """A submitted task (JSON object, or task-submitted Avro data)."""

    model_config = ConfigDict(extra="forbid", str_max_length=100_000)

    task_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["generate", "embed", "classify"]
    input: str
    template: str | None = Field(None, max_length=64)
    params: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=32)
    priority: Literal["high", "normal", "low"] = "normal"
    callback_url: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=2048)
    deadline: datetime | None = None
    model: str | None = Field(None, max_length=128)
    labels: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    def avro(self) -> dict[str, Any]:
        """The task as task-submitted Avro data (params as strings, deadline as RFC 3339)."""
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "kind": self.kind,
            "input": self.input,
            "template": self.template,
            "params": {k: param_text(v) for k, v in self.params.items()},
            "priority": self.priority,
            "callback_url": self.callback_url,
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "model": self.model,
            "labels": list(self.labels),
        }


def param_text(value: str | int | float | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_task(data: Any) -> TaskRequest:
    """Validate `data`; raise `PermanentError` naming every problem."""
    if not isinstance(data, Mapping):
        raise PermanentError("task data must be a JSON object")
    try:
        return TaskRequest.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'data'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PermanentError(f"invalid task: {problems}") from None
