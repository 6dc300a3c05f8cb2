"""The batch API's shapes: the batch object and the lines of its results file.

The batch object follows the OpenAI Batch API's (`id`, `object: "batch"`, `endpoint`, `status`,
`completion_window`, `request_counts`, `metadata`), with times as RFC 3339 UTC strings like the
rest of the gateway, and `request_counts` holding the total and the batch's tasks per status
(every status present). A results line is `{"id", "custom_id", "status", "response", "error"}`:
`response.body` is the task as `GET /v1/tasks/{id}` shows it (without the timeline) once the task
completed or was blocked, and `error` says why a task failed, expired or was cancelled; a task
still running has both null and its status says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from conveyor.store import TaskRecord, TaskStatus
from conveyor.store.batches import BatchItem, BatchRecord
from conveyor.web.schema import task_view

ENDPOINT = "/v1/tasks"
# A response for these: the task was run and its outcome is the answer (blocked: withheld).
_ANSWERED = frozenset({TaskStatus.COMPLETED, TaskStatus.BLOCKED})
_ERRORED = frozenset({TaskStatus.FAILED, TaskStatus.EXPIRED, TaskStatus.CANCELLED})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def batch_view(
    batch: BatchRecord, counts: Mapping[str, int], *, results_url: str
) -> dict[str, Any]:
    return {
        "id": batch.batch_id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "status": batch.status,
        "completion_window": batch.completion_window,
        "created_at": _iso(batch.created_at),
        "expires_at": _iso(batch.expires_at),
        "ended_at": _iso(batch.ended_at),
        "request_counts": {"total": batch.total, **counts},
        "results_url": results_url,
        "metadata": batch.metadata,
        "errors": None if batch.error is None else [{"message": batch.error}],
    }


def result_line(item: BatchItem, task: TaskRecord | None) -> str:
    """One line of the results file (with its newline)."""
    status = task.status if task is not None else TaskStatus.PENDING
    response = None
    error = None
    if task is not None and task.status in _ANSWERED:
        response = {"body": task_view(task)}
    elif task is not None and task.status in _ERRORED:
        error = {"code": task.status, "message": task.error}
    line = {
        "id": item.task_id,
        "custom_id": item.custom_id,
        "status": status,
        "response": response,
        "error": error,
    }
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
