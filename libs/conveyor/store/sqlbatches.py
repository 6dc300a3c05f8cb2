"""The batch half of `SqlStore` (`BatchStore`, `conveyor.store.batches`), written once over the
store's `Dialect`: `create_batch` inserts the batch, its items and a `pending` reservation of each
task in one transaction; progress is counted from the tasks' rows.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from conveyor.store import dispatch
from conveyor.store.base import (
    STATUSES,
    TERMINAL_STATUSES,
    TaskRecord,
    TaskStatus,
    task_from_row,
    tenant_key,
)
from conveyor.store.batches import (
    BatchConflictError,
    BatchItem,
    BatchRecord,
    BatchSql,
    BatchStatus,
    NewBatchItem,
    batch_from_row,
    batch_params,
    set_status_sql,
)
from conveyor.store.dialect import Dialect
from conveyor.store.statements import StoreSql


class SqlBatches:
    """`BatchStore` methods; `SqlStore` sets the dialect and the statements."""

    _d: Dialect
    _sql: StoreSql
    _batch: BatchSql
    _dispatch: dispatch.DispatchSql

    def create_batch(self, batch: BatchRecord, items: Sequence[NewBatchItem]) -> None:
        tenant = tenant_key(batch.tenant)
        now = self._d.stamp(batch.created_at)
        pending = TaskStatus.PENDING
        with self._d.transaction() as cur:
            cur.execute(self._batch.insert, batch_params(batch, self._d.stamp))
            cur.executemany(
                self._batch.item_insert,
                [
                    (tenant, batch.batch_id, n.item.line, n.item.custom_id, n.item.task_id)
                    for n in items
                ],
            )
            cur.executemany(
                self._sql.reserve,
                [
                    (tenant, n.item.task_id, pending, now, now, n.kind, n.callback_url, n.digest)
                    for n in items
                ],
            )
            if cur.rowcount != len(items):  # rolled back with the batch
                raise BatchConflictError(f"a task id of batch {batch.batch_id} is taken")
            dispatch.insert(cur, self._dispatch, tenant, batch.batch_id, items)

    def get_batch(self, tenant: str, batch_id: str) -> BatchRecord | None:
        with self._d.read() as cur:
            row = cur.execute(self._batch.select, (tenant_key(tenant), batch_id)).fetchone()
        return None if row is None else batch_from_row(row, self._d.time)

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
        if not expect:
            return False  # no status to move from
        sql = set_status_sql(self._d.p, len(expect))
        params = (status, self._d.stamp(ended_at), error, tenant_key(tenant), batch_id, *expect)
        with self._d.transaction() as cur:
            cur.execute(sql, params)
            return cur.rowcount == 1

    def batch_counts(self, tenant: str, batch_id: str) -> dict[str, int]:
        with self._d.read() as cur:
            rows = cur.execute(self._batch.counts, (tenant_key(tenant), batch_id)).fetchall()
        return per_status(rows)

    def batch_unfinished(self, tenant: str, batch_id: str, *, limit: int) -> list[str]:
        params = (tenant_key(tenant), batch_id, *sorted(TERMINAL_STATUSES), limit)
        with self._d.read() as cur:
            rows = cur.execute(self._batch.unfinished, params).fetchall()
        return [str(r[0]) for r in rows]

    def batch_results(
        self, tenant: str, batch_id: str, *, after_line: int, limit: int
    ) -> list[tuple[BatchItem, TaskRecord | None]]:
        params = (tenant_key(tenant), batch_id, after_line, limit)
        with self._d.read() as cur:
            rows = cur.execute(self._batch.results, params).fetchall()
        return [
            (
                BatchItem(r[0], r[1], r[2]),
                None if r[3] is None else task_from_row(r[3:], self._d.time),
            )
            for r in rows
        ]

    def _task_or_none(self, row: Sequence[Any]) -> TaskRecord | None:
        # A LEFT JOIN row whose task was removed has NULLs where the task's columns are.
        return None if row[0] is None else task_from_row(row, self._d.time)

    def batch_of(self, task_id: str, *, tenant: str) -> str | None:
        with self._d.read() as cur:
            row = cur.execute(self._batch.batch_of, (tenant_key(tenant), task_id)).fetchone()
        return None if row is None else str(row[0])

    def overdue_batches(self, now: datetime, *, limit: int) -> list[BatchRecord]:
        params = (BatchStatus.CANCELLING, BatchStatus.IN_PROGRESS, self._d.stamp(now), limit)
        with self._d.read() as cur:
            rows = cur.execute(self._batch.overdue, params).fetchall()
        return [batch_from_row(row, self._d.time) for row in rows]

    # Paced batch dispatch and the batch list (`conveyor.store.dispatch`).

    def claim_dispatch(
        self, *, window: int | None, lease_s: float, now: datetime, min_free: int = 1
    ) -> list[dispatch.DispatchItem]:
        with self._d.transaction() as cur:
            return dispatch.claim(
                cur,
                self._dispatch,
                window=window,
                lease_s=lease_s,
                now=now,
                stamp=self._d.stamp,
                min_free=min_free,
            )

    def finish_dispatch(
        self,
        *,
        dispatched: Sequence[dispatch.DispatchItem],
        done: Sequence[dispatch.DispatchItem] = (),
        released: Sequence[dispatch.DispatchItem] = (),
    ) -> None:
        with self._d.transaction() as cur:
            dispatch.finish(
                cur, self._dispatch, dispatched=dispatched, done=done, released=released
            )

    def stop_dispatch(self, tenant: str, batch_id: str, *, now: datetime) -> list[str]:
        with self._d.transaction() as cur:
            return dispatch.stop(
                cur, self._dispatch, tenant_key(tenant), batch_id, now=now, stamp=self._d.stamp
            )

    def list_batches(
        self, tenant: str, *, limit: int, after: str | None = None
    ) -> list[BatchRecord]:
        cursor = None if after is None else self.get_batch(tenant, after)
        if after is not None and cursor is None:
            return []
        with self._d.read() as cur:
            rows = dispatch.list_batches(
                cur,
                self._dispatch,
                tenant_key(tenant),
                limit=limit,
                after=cursor,
                stamp=self._d.stamp,
            )
        return [batch_from_row(row, self._d.time) for row in rows]


def per_status(rows: Sequence[Any]) -> dict[str, int]:
    """Counts per status from (status, count) rows: every status present, zeros included."""
    counts = dict.fromkeys(sorted(STATUSES), 0)
    counts.update({str(status): int(count) for status, count in rows})
    return counts
