"""The cancel topic: one compacted record per cancelled task, read in full by every stage.

`conveyor.task.cancelled` (with the deployment's prefix) has one partition: cancels are few,
every stage replica reads all of them anyway, and one partition makes "read to its end" one
watermark. Key = `cancel_key(tenant, task id)`, so compaction keeps one record per task; value =
a small JSON note (task id, tenant, time, who); a null value (tombstone) withdraws the key. The
records are deleted after `RETENTION_DAYS`: longer than any record of the task can wait in a
stage topic or on the retry ladder, so a replica that starts later still skips it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

CANCEL_TOPIC = "conveyor.task.cancelled"
RETENTION_DAYS = 7
CANCEL_CONFIG = {
    "cleanup.policy": "compact,delete",
    "retention.ms": str(RETENTION_DAYS * 24 * 3600 * 1000),
}


def cancel_key(tenant: str | None, task_id: str) -> bytes:
    """The record key (and the watch's set member) of a task: the tenant length-prefixed, so no
    tenant or task id spelling can make two tasks' keys equal."""
    tenant = tenant or ""
    return f"{len(tenant)}:{tenant}/{task_id}".encode()


def cancel_note(task_id: str, tenant: str, *, at: datetime, by: str) -> bytes:
    """The record value: what was cancelled, when, through what (`gateway`, `cli`)."""
    note: dict[str, Any] = {"task_id": task_id, "tenant": tenant, "time": at.isoformat(), "by": by}
    return json.dumps(note, separators=(",", ":")).encode()
