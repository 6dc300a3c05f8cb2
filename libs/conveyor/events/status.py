"""The status event's data: the one place its fields are named (`schemas/task-status.v2.avsc`).

A status event (`conveyor.task.status.v1` on `conveyor.task.status`) reports what the stage
topics cannot show: a task starting to retry, dead-lettered (`failed`) or `expired`. The runtime's
failure routing and inference's deadline check both build it from `StatusData`, so the two
cannot drift apart, and the status is a `TaskStatus`, never a free string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from conveyor.events.catalog import STATUS_TYPE
from conveyor.store.base import TaskStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusData:
    """One status event's data, field for field (and in order) the newest `task-status` schema."""

    EVENT_TYPE: ClassVar[str] = STATUS_TYPE

    task_id: str
    tenant: str = ""
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

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> StatusData:
        """From the decoded record (v1 data too: the reader schema fills `rejected_record`).
        ValueError for a status that is not a `TaskStatus`."""
        return cls(
            task_id=d["task_id"],
            tenant=d.get("tenant") or "",
            status=TaskStatus(d["status"]),
            stage=d["stage"],
            reason=d.get("reason"),
            error_class=d.get("error_class"),
            attempt=d.get("attempt") or 0,
            callback_url=d.get("callback_url"),
            kind=d.get("kind"),
            time=d["time"],
            rejected_record=bool(d.get("rejected_record")),
        )

    def to_data(self) -> dict[str, Any]:
        """The Avro record (the status as its string value)."""
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "status": self.status.value,
            "stage": self.stage,
            "reason": self.reason,
            "error_class": self.error_class,
            "attempt": self.attempt,
            "callback_url": self.callback_url,
            "kind": self.kind,
            "time": self.time,
            "rejected_record": self.rejected_record,
        }

    def record(self) -> dict[str, Any]:
        """The Avro record: `to_data` under the name the runtime's failure routing uses."""
        return self.to_data()
