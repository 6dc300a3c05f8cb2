"""The status event's data: the one place its fields are named (`schemas/task-status.v2.avsc`).

A status event (`conveyor.task.status.v1` on `conveyor.task.status`) reports what the stage
topics cannot show: a task starting to retry, dead-lettered (`failed`) or `expired`. The runtime's
failure routing and inference's deadline check both build it from `StatusData`, so the two
cannot drift apart, and the status is a `TaskStatus`, never a free string.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from conveyor.store.base import TaskStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusData:
    """One status event's data, field for field (and in order) the newest `task-status` schema."""

    task_id: str
    tenant: str
    status: TaskStatus
    stage: str
    reason: str | None = None
    error_class: str | None = None
    attempt: int = 0
    callback_url: str | None = None
    kind: str | None = None
    time: str  # ISO 8601, when the status was reached
    # Reported for a record rejected before it decoded: task_id is only its record key.
    rejected_record: bool = False

    def record(self) -> dict[str, Any]:
        """The Avro record (the status as its string value)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["status"] = self.status.value
        return out
