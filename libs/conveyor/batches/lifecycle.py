"""A batch's life over the store: created, refreshed on every read, cancelled, expired.

A batch's tasks are named `<batch id>.<line>`, so any stage can tell a task's batch from its id
without a lookup (`batch_of_task`). Its status moves only forward: `in_progress` becomes
`completed` once every task has ended; `cancelling` (asked for) becomes `cancelled` once its
unfinished tasks are ended `cancelled`; `in_progress` past `expires_at` ends its unfinished tasks
`expired` and becomes `expired`. Ending a task is an ordinary store update (a status event
written by the gateway, with a deterministic event id and a timeline entry), so the store's
precedence rule holds: a task that ended first keeps its outcome, and a late result of a task
ended here loses to the terminal status. Refreshing happens when the batch is read (status,
results, cancel) and in a periodic sweep of the batches past their window (`sweep`); their tasks
also expire in inference on their own, since their deadline is the batch's expiry. Ending a
batch stops its dispatch (`DispatchStore.stop_dispatch`): its tasks never dispatched are ended in
the store alone; a cancel sends its dispatched unfinished ones (at most the dispatch window's
worth) through the ordinary task cancel.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from conveyor.batches.jsonl import BatchLine
from conveyor.events.catalog import STATUS_TYPE
from conveyor.events.model import event_id
from conveyor.store import ResultStore, TaskStatus, TaskUpdate, is_terminal
from conveyor.store.batches import (
    BATCH_ENDED,
    BatchItem,
    BatchRecord,
    BatchStatus,
    BatchStore,
    NewBatchItem,
)
from conveyor.store.dispatch import DispatchStore

log = logging.getLogger(__name__)

BATCH_PREFIX = "batch_"
# "24h" is the OpenAI default; seconds make short windows testable; a week is ample for a job
# meant to finish overnight, and keeps every task deadline far inside the ingress bound.
DEFAULT_WINDOW = "24h"
MAX_WINDOW = timedelta(days=7)
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Tasks ended per store transaction: short enough not to hold the write lock for long.
END_CHUNK = 500


class Store(ResultStore, BatchStore, DispatchStore, Protocol):
    """Both backends are all three."""


# Cancels one dispatched task through the ordinary task-cancel path (`Canceller.cancel`:
# recorded in the store, then published on the cancel topic every stage watches).
CancelTask = Callable[[str, str], object]


def new_batch_id() -> str:
    return BATCH_PREFIX + secrets.token_hex(12)


def batch_task_id(batch_id: str, line: int) -> str:
    return f"{batch_id}.{line}"


def batch_of_task(task_id: str) -> str | None:
    """The batch id a task id names (`<batch id>.<line>`), or None for a task of no batch."""
    if not task_id.startswith(BATCH_PREFIX):
        return None
    batch_id, dot, line = task_id.rpartition(".")
    return batch_id if dot and line.isdigit() else None


def parse_window(text: str) -> timedelta:
    """`24h`, `90m`, `30s`, `2d`: a positive duration up to `MAX_WINDOW`; ValueError otherwise."""
    match = _WINDOW.match(text)
    if match is None:
        raise ValueError("completion_window must be a number and a unit s, m, h or d, e.g. 24h")
    window = timedelta(seconds=int(match[1]) * _UNIT_S[match[2]])
    if window > MAX_WINDOW:
        raise ValueError(f"completion_window must be at most {MAX_WINDOW.days}d")
    return window


def create(
    store: Store,
    lines: Sequence[BatchLine],
    *,
    batch_id: str,
    tenant: str,
    window: str,
    now: datetime,
    digest: Callable[[dict[str, Any]], str],
    metadata: dict[str, str] | None = None,
) -> BatchRecord:
    """Record the batch, its items and each task's reservation (all or nothing)."""
    batch = BatchRecord(
        batch_id=batch_id,
        tenant=tenant,
        status=BatchStatus.IN_PROGRESS,
        created_at=now,
        expires_at=now + parse_window(window),
        completion_window=window,
        total=len(lines),
        metadata=metadata,
    )
    items = [
        NewBatchItem(
            BatchItem(line.line, line.custom_id, line.task.task_id),
            kind=line.task.kind,
            digest=digest(line.body),
            callback_url=line.task.callback_url,
            body=line.body,
        )
        for line in lines
    ]
    store.create_batch(batch, items)
    log.info("batch created batch_id=%s tenant=%s tasks=%d", batch_id, tenant, len(lines))
    return batch


def refresh(
    store: Store, batch: BatchRecord, now: datetime, cancel_task: CancelTask | None = None
) -> BatchRecord:
    """The batch brought up to date (see the module docstring); returns it as stored.
    `cancel_task` cancels the dispatched tasks of a batch being cancelled (None: they are
    ended in the store only, and the stages run them to a result that loses)."""
    if batch.status in BATCH_ENDED:
        return batch
    if batch.status == BatchStatus.CANCELLING:
        return _finish(store, batch, TaskStatus.CANCELLED, BatchStatus.CANCELLED, now, cancel_task)
    if not store.batch_unfinished(batch.tenant, batch.batch_id, limit=1):
        # Every task ended (perhaps before the window passed, read only now): completed.
        store.set_batch_status(
            batch.tenant, batch.batch_id, BatchStatus.COMPLETED, expect=[batch.status], ended_at=now
        )
    elif now >= batch.expires_at:
        return _finish(store, batch, TaskStatus.EXPIRED, BatchStatus.EXPIRED, now)
    return _reread(store, batch)


def cancel(
    store: Store, batch: BatchRecord, now: datetime, cancel_task: CancelTask | None = None
) -> BatchRecord:
    """Cancel an unfinished batch: `cancelling` first (so dispatch stops, and a crash midway is
    finished by the next read), then its tasks never dispatched end `cancelled` in the store and
    its dispatched unfinished ones are cancelled through `cancel_task`; an ended batch stays as
    it is."""
    batch = refresh(store, batch, now, cancel_task)
    if batch.status == BatchStatus.IN_PROGRESS:
        store.set_batch_status(
            batch.tenant, batch.batch_id, BatchStatus.CANCELLING, expect=[BatchStatus.IN_PROGRESS]
        )
        batch = refresh(store, _reread(store, batch), now, cancel_task)
    return batch


def sweep(
    store: Store, now: datetime, *, limit: int = 100, cancel_task: CancelTask | None = None
) -> int:
    """Bring up to date the batches left `cancelling` or past their window that nobody read
    (the gateway runs this every `batch_sweep_s`); returns how many it ended."""
    ended = 0
    for batch in store.overdue_batches(now, limit=limit):
        ended += refresh(store, batch, now, cancel_task).status in BATCH_ENDED
    return ended


def fail_task(store: Store, batch: BatchRecord, task_id: str, reason: str) -> None:
    """One task of the batch could not be published (the client refused it alone)."""
    now = datetime.now(UTC)
    _end_tasks(store, batch, [task_id], TaskStatus.FAILED, f"not published: {reason}", now)


def _finish(
    store: Store,
    batch: BatchRecord,
    task_status: TaskStatus,
    status: BatchStatus,
    now: datetime,
    cancel_task: CancelTask | None = None,
) -> BatchRecord:
    reason = (
        f"batch {batch.batch_id} cancelled"
        if status == BatchStatus.CANCELLED
        else f"batch {batch.batch_id} completion window {batch.completion_window} passed"
    )
    # Never dispatched: nothing runs them, so the store alone ends them (and dispatch skips
    # them from now on; the batch is no longer `in_progress` either).
    never = store.stop_dispatch(batch.tenant, batch.batch_id, now=now)
    _end_tasks(store, batch, never, task_status, reason, now)
    # Each round ends up to END_CHUNK tasks; the bound only guards against a task that will not
    # end (an operator re-run reopening it between rounds), never reached otherwise.
    for _ in range(batch.total // END_CHUNK + 2):
        ids = store.batch_unfinished(batch.tenant, batch.batch_id, limit=END_CHUNK)
        if not ids:
            break
        if task_status == TaskStatus.CANCELLED and cancel_task is not None:
            # Dispatched and unfinished (at most the dispatch window's worth): the ordinary
            # cancel, so every stage drops their records and inference runs none of them.
            for task_id in ids:
                cancel_task(task_id, batch.tenant)
        else:  # expired (inference expires them too: their deadline is the batch's expiry)
            _end_tasks(store, batch, ids, task_status, reason, now)
    store.set_batch_status(
        batch.tenant, batch.batch_id, status, expect=[batch.status], ended_at=now
    )
    log.info("batch ended batch_id=%s tenant=%s status=%s", batch.batch_id, batch.tenant, status)
    return _reread(store, batch)


def _end_tasks(
    store: Store,
    batch: BatchRecord,
    task_ids: Sequence[str],
    status: TaskStatus,
    reason: str,
    now: datetime,
) -> None:
    """End tasks with `status` through the store's precedence rule (an ended task stays)."""
    for start in range(0, len(task_ids), END_CHUNK):
        updates = [
            TaskUpdate(
                task_id=task_id,
                # The discriminator inference uses for `expired`: one expiry per task, whoever
                # records it first.
                event_id=event_id(task_id, STATUS_TYPE, str(status), tenant=batch.tenant),
                event_type=STATUS_TYPE,
                status=status,
                time=now,
                stage="gateway",
                tenant=batch.tenant,
                error=reason,
                detail=reason,
            )
            for task_id in task_ids[start : start + END_CHUNK]
        ]
        store.apply_many(updates)


def _reread(store: Store, batch: BatchRecord) -> BatchRecord:
    return store.get_batch(batch.tenant, batch.batch_id) or batch


def unfinished_count(counts: Mapping[str, int]) -> int:
    return sum(n for status, n in counts.items() if not is_terminal(status))
