"""The batch part of the result store: batch records, their items, and the `BatchStore` protocol.

A batch is (tenant, batch id), like a task. Its items are the lines of the submitted JSONL file:
each names the task it became (`task_id`) and the caller's `custom_id`, and its line number
orders the results. Both backends keep them in two tables of their own, `batches` and
`batch_items` (additive: nothing in `tasks` changes); a task knows its batch through its item
(`batch_of`). `create_batch` inserts the batch, its items and a `pending` reservation of every
task in one transaction, so a batch is either wholly accepted or not at all. A batch's progress
is its tasks' statuses, counted from `tasks`; its own `status` only records what the tasks
cannot say: `in_progress`, then `cancelling`/`cancelled` (asked for), `expired` (its completion
window passed), `completed` (every task ended) or `failed` (it could not be published).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from conveyor.store.base import TASK_COLUMNS, TERMINAL_STATUSES, TaskRecord


class BatchStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    COMPLETED = "completed"
    FAILED = "failed"


# A batch in one of these is over: its status never changes again.
BATCH_ENDED: frozenset[str] = frozenset(
    {BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.COMPLETED, BatchStatus.FAILED}
)
# Tasks of a batch in one of these are not worth running any more (stages skip them).
BATCH_STOPPED: frozenset[str] = frozenset(
    {BatchStatus.CANCELLING, BatchStatus.CANCELLED, BatchStatus.EXPIRED}
)


class BatchConflictError(ValueError):
    """A task id of a new batch is taken already (the batch is not created)."""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch, as stored in `batches`."""

    batch_id: str
    tenant: str
    status: str
    created_at: datetime
    expires_at: datetime
    completion_window: str
    total: int
    metadata: dict[str, str] | None = None
    ended_at: datetime | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One line of a batch: where it was in the file, the caller's id for it, its task."""

    line: int
    custom_id: str
    task_id: str


@dataclass(frozen=True, slots=True)
class NewBatchItem:
    """An item of a batch being created, with what its task's reservation records."""

    item: BatchItem
    kind: str
    digest: str
    callback_url: str | None = None
    body: dict[str, Any] | None = None  # the task as it will be published (paced dispatch)


BATCH_COLUMNS = (
    "batch_id",
    "tenant",
    "status",
    "created_at",
    "expires_at",
    "completion_window",
    "total",
    "metadata",
    "ended_at",
    "error",
)


@dataclass(frozen=True, slots=True)
class BatchSql:
    """The batch statements, with one backend's placeholder `p` (`batch_sql`)."""

    insert: str
    item_insert: str
    select: str
    unfinished: str
    counts: str
    results: str
    batch_of: str
    overdue: str


def batch_sql(p: str) -> BatchSql:
    """The statements of the batch part, written once for both backends."""
    key = f"i.tenant = {p} AND i.batch_id = {p}"
    items_with_tasks = (
        "FROM batch_items i JOIN tasks t ON t.tenant = i.tenant AND t.task_id = i.task_id"
    )
    terminal = ", ".join([p] * len(TERMINAL_STATUSES))
    return BatchSql(
        insert=(
            f"INSERT INTO batches ({', '.join(BATCH_COLUMNS)}) "
            f"VALUES ({', '.join([p] * len(BATCH_COLUMNS))})"
        ),
        item_insert=(
            "INSERT INTO batch_items (tenant, batch_id, line, custom_id, task_id) "
            f"VALUES ({p}, {p}, {p}, {p}, {p})"
        ),
        select=(
            f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE tenant = {p} AND batch_id = {p}"
        ),
        # The reservation made each task row with its item, so the inner join loses none.
        unfinished=(
            f"SELECT i.task_id {items_with_tasks} WHERE {key} "
            f"AND t.status NOT IN ({terminal}) ORDER BY i.line LIMIT {p}"
        ),
        counts=f"SELECT t.status, COUNT(*) {items_with_tasks} WHERE {key} GROUP BY t.status",
        # Results use a LEFT JOIN all the same, in case a task row was removed.
        results=(
            "SELECT i.line, i.custom_id, i.task_id, "
            + ", ".join(f"t.{c}" for c in TASK_COLUMNS)
            + " FROM batch_items i LEFT JOIN tasks t "
            "ON t.tenant = i.tenant AND t.task_id = i.task_id "
            f"WHERE {key} AND i.line > {p} ORDER BY i.line LIMIT {p}"
        ),
        batch_of=f"SELECT batch_id FROM batch_items WHERE tenant = {p} AND task_id = {p}",
        overdue=(
            f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE status = {p} "
            f"OR (status = {p} AND expires_at <= {p}) ORDER BY expires_at LIMIT {p}"
        ),
    )


def set_status_sql(p: str, expected: int) -> str:
    """Move a batch to a status if it is in one of `expected` statuses."""
    return (
        f"UPDATE batches SET status = {p}, ended_at = COALESCE({p}, ended_at), "
        f"error = COALESCE({p}, error) WHERE tenant = {p} AND batch_id = {p} "
        f"AND status IN ({', '.join([p] * expected)})"
    )


def batch_from_row(row: Sequence[Any], to_time: Callable[[Any], datetime | None]) -> BatchRecord:
    """A `BatchRecord` from a row in `BATCH_COLUMNS` order; `to_time` decodes timestamps."""
    values = dict(zip(BATCH_COLUMNS, row, strict=True))
    for name in ("created_at", "expires_at", "ended_at"):
        values[name] = to_time(values[name])
    values["metadata"] = None if values["metadata"] is None else json.loads(values["metadata"])
    return BatchRecord(**values)


def batch_params(
    batch: BatchRecord, from_time: Callable[[datetime | None], Any]
) -> tuple[Any, ...]:
    """Inverse of `batch_from_row`: parameters in `BATCH_COLUMNS` order."""
    values = [getattr(batch, name) for name in BATCH_COLUMNS]
    for i, name in enumerate(BATCH_COLUMNS):
        if name in ("created_at", "expires_at", "ended_at"):
            values[i] = from_time(values[i])
        elif name == "metadata" and values[i] is not None:
            values[i] = json.dumps(values[i], sort_keys=True)
    return tuple(values)


@runtime_checkable
class BatchStore(Protocol):
    """What the batch API needs from the store beyond `ResultStore` (both backends have it)."""

    def create_batch(self, batch: BatchRecord, items: Sequence[NewBatchItem]) -> None:
        """Insert the batch, its items and a `pending` reservation of each task, in one
        transaction; `BatchConflictError` (nothing inserted) when a task id is taken."""
        ...

    def get_batch(self, tenant: str, batch_id: str) -> BatchRecord | None:
        """That tenant's batch, or None."""
        ...

    def set_batch_status(
        self,
        tenant: str,
        batch_id: str,
        status: str,
        *,
        expect: Collection[str],
        ended_at: datetime | None = None,
        error: str | None = None,
    ) -> bool:
        """Move the batch to `status` if it is in one of `expect`; False if it was not."""
        ...

    def batch_counts(self, tenant: str, batch_id: str) -> dict[str, int]:
        """The batch's tasks per status (every status present, zeros included)."""
        ...

    def batch_unfinished(self, tenant: str, batch_id: str, *, limit: int) -> list[str]:
        """Up to `limit` task ids of the batch not yet in a terminal status, in input order."""
        ...

    def batch_results(
        self, tenant: str, batch_id: str, *, after_line: int, limit: int
    ) -> list[tuple[BatchItem, TaskRecord | None]]:
        """Up to `limit` items after line `after_line`, in input order, with their tasks."""
        ...

    def batch_of(self, task_id: str, *, tenant: str) -> str | None:
        """The id of the batch the tenant's task belongs to, or None."""
        ...

    def overdue_batches(self, now: datetime, *, limit: int) -> list[BatchRecord]:
        """Up to `limit` batches, of every tenant, left `cancelling` or `in_progress` past their
        expiry: what a sweep brings up to date (oldest expiry first)."""
        ...
