"""The result store, written once over a `Dialect` (`conveyor.store.dialect`).

Every method is one transaction of the dialect (reads: one consistent read). `apply` inserts the
event with `ON CONFLICT (event_id) DO NOTHING` (a duplicate ends the call), reads the task row
with the dialect's lock (`FOR UPDATE` on PostgreSQL; SQLite's `BEGIN IMMEDIATE` holds the whole
database), merges in Python with the pure `merge_task` and writes the row back; two writers
racing to create the same task are resolved by `ON CONFLICT (tenant, task_id) DO NOTHING` and a
second locked read. `reserve` is the same insert-if-absent. The statements are in
`statements.py`, `batches.py`, `lifecycle.py` and `variantruns.py`; the schema in `schema.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.errors import RetryableError
from conveyor.store import dispatch, lifecycle
from conveyor.store.base import (
    NOTIFICATION_CLAIMED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_REJECTED,
    TASK_COLUMNS,
    AmbiguousTaskError,
    Applied,
    NotificationRecord,
    Reservation,
    ReuseClaim,
    ReuseEntry,
    ReuseLookup,
    SweepReport,
    TaskEventRecord,
    TaskRecord,
    TaskStatus,
    TaskUpdate,
    merge_task,
    task_from_row,
    task_params,
    tenant_key,
    utcnow,
)
from conveyor.store.batches import batch_sql
from conveyor.store.dialect import Cursor, Dialect
from conveyor.store.schema import create_schema
from conveyor.store.sqlbatches import SqlBatches, per_status
from conveyor.store.statements import UNFINISHED, UPDATED_COLUMNS, store_sql
from conveyor.store.variantruns import RUN_SELECT, VariantRun, run_from_row, run_params, run_upsert

log = logging.getLogger(__name__)

_TENANT = TASK_COLUMNS.index("tenant")


class SqlStore(SqlBatches):
    """`ResultStore` and `BatchStore` on any `Dialect`; `open_store(url)` picks the dialect.

    A new method is written once, after the last section and before the row helpers
    (docs/store.md)."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect
        self._sql = store_sql(dialect)
        self._batch = batch_sql(dialect.p)
        self._life = lifecycle.lifecycle_sql(dialect.p)
        self._dispatch = dispatch.dispatch_sql(dialect.p, lock=dialect.claim_lock)
        self._run_upsert = run_upsert(dialect.p)
        with dialect.transaction() as cur:
            create_schema(cur, dialect)
        log.info("result store opened backend=%s dialect=%r", dialect.name, dialect)

    def __repr__(self) -> str:
        return f"SqlStore({self._d!r})"

    def close(self) -> None:
        self._d.close()
        log.info("result store closed backend=%s", self._d.name)

    # Tasks and timelines.

    def apply(self, update: TaskUpdate) -> bool:
        return self.apply_many([update])[0].new

    def apply_many(self, updates: Sequence[TaskUpdate]) -> list[Applied]:
        with self._d.transaction() as cur:
            return [self._apply_one(cur, update) for update in updates]

    def _apply_one(self, cur: Cursor, update: TaskUpdate) -> Applied:
        tenant = tenant_key(update.tenant)
        if update.rejected_record:  # its tenant is as untrustworthy as its key
            tenant = self._rejected_owner(cur, update.task_id, tenant)
            update = dataclasses.replace(update, tenant=tenant or None)
        key = (tenant, update.task_id)
        cur.execute(self._sql.event_insert, self._event_params(tenant, update))
        if cur.rowcount == 0:
            log.debug(
                "duplicate event skipped task_id=%s event_id=%s", update.task_id, update.event_id
            )
            row = cur.execute(self._sql.task_by_key, key).fetchone()
            assert row is not None  # its event was recorded with the row, in one transaction
            return Applied(False, self._task(row))
        return Applied(True, self._merge(cur, key, update))

    def _merge(self, cur: Cursor, key: tuple[str, str], update: TaskUpdate) -> TaskRecord:
        """Merge `update` into the task's locked row and write it back; the merged row."""
        # Two rounds at most: the first may lose a race to insert the row (PostgreSQL; SQLite's
        # write lock excludes it), the second then finds it (committed) and locks it.
        for _ in range(2):
            row = cur.execute(self._sql.task_for_update, key).fetchone()
            current = None if row is None else self._task(row)
            merged = merge_task(current, update)
            if current is None:
                cur.execute(self._sql.task_insert, task_params(merged, self._d.stamp))
                if cur.rowcount == 0:
                    continue  # another writer created it first
            elif merged is not current:
                values = dict(zip(TASK_COLUMNS, task_params(merged, self._d.stamp), strict=True))
                cur.execute(self._sql.task_update, (*(values[c] for c in UPDATED_COLUMNS), *key))
            return merged
        raise RetryableError(f"task row contention task_id={update.task_id}")

    def _event_params(self, tenant: str, update: TaskUpdate) -> tuple[Any, ...]:
        return (
            tenant,
            update.event_id,
            update.task_id,
            update.event_type,
            update.entry_status,
            self._d.stamp(update.time),
            update.stage,
            update.detail,
        )

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord | None:
        with self._d.read() as cur:
            row = self._task_row(cur, task_id, tenant)
        record = None if row is None else self._task(row)
        return None if record is None or record.expired(utcnow()) else record

    def timeline(self, task_id: str, *, tenant: str | None = None) -> list[TaskEventRecord]:
        with self._d.read() as cur:
            row = self._task_row(cur, task_id, tenant)
            if row is None or self._task(row).expired(utcnow()):
                return []
            rows = cur.execute(self._sql.timeline, (row[_TENANT], task_id)).fetchall()
        return [
            TaskEventRecord(r[0], r[1], r[2], r[3], self._required_time(r[4]), r[5], r[6])
            for r in rows
        ]

    def expired_at(self, task_id: str, *, tenant: str | None = None) -> datetime | None:
        with self._d.read() as cur:
            row = self._task_row(cur, task_id, tenant)
        record = None if row is None else self._task(row)
        return record.expires_at if record is not None and record.expired(utcnow()) else None

    def count_by_status(self) -> dict[str, int]:
        with self._d.read() as cur:
            rows = cur.execute(self._sql.count_by_status).fetchall()
        return per_status(rows)

    def count_unfinished(self, tenant: str) -> int:
        """The tenant's tasks not yet in a terminal status (the gateway's in-flight quota)."""
        with self._d.read() as cur:
            params = (tenant_key(tenant), *UNFINISHED)
            found = cur.execute(self._sql.count_unfinished, params).fetchone()
        return int(found[0]) if found else 0

    # Reservations.

    def reserve(
        self,
        task_id: str,
        tenant: str,
        *,
        time: datetime,
        digest: str,
        kind: str | None = None,
        callback_url: str | None = None,
    ) -> Reservation:
        key = (tenant_key(tenant), task_id)
        at = self._d.stamp(time)
        with self._d.transaction() as cur:
            cur.execute(
                self._sql.reserve, (*key, TaskStatus.PENDING, at, at, kind, callback_url, digest)
            )
            new = cur.rowcount == 1
            row = cur.execute(self._sql.reservation, key).fetchone()
        # Not found only if a concurrent release dropped it between the two statements.
        if row is None:
            raise RetryableError(f"reservation of task {task_id} released concurrently")
        return Reservation(new, self._task(row[:-1]), row[-1])

    def release(self, task_id: str, tenant: str, digest: str) -> bool:
        key = (tenant_key(tenant), task_id)
        with self._d.transaction() as cur:
            cur.execute(self._sql.release, (*key, TaskStatus.PENDING, digest, *key))
            return cur.rowcount == 1

    # Notifications.

    def claim_notification(
        self,
        task_id: str,
        event_id: str,
        url: str,
        *,
        tenant: str | None = None,
        lease_s: float | None = None,
    ) -> bool:
        now = utcnow()
        cutoff = datetime.min.replace(tzinfo=UTC)
        if lease_s is not None:
            cutoff = now - timedelta(seconds=lease_s)
        claimed = NOTIFICATION_CLAIMED
        stamp = self._d.stamp
        params = (tenant_key(tenant), task_id, event_id, claimed, url, stamp(now), claimed)
        with self._d.transaction() as cur:
            cur.execute(self._sql.claim, (*params, stamp(cutoff)))
            return cur.rowcount == 1

    def complete_notification(
        self, task_id: str, http_status: int, *, tenant: str | None = None
    ) -> bool:
        status = NOTIFICATION_DELIVERED if 200 <= http_status < 400 else NOTIFICATION_REJECTED
        done = (status, http_status, self._d.stamp(utcnow()))
        with self._d.transaction() as cur:
            cur.execute(
                self._sql.complete_notification,
                (*done, tenant_key(tenant), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def release_notification(self, task_id: str, *, tenant: str | None = None) -> bool:
        with self._d.transaction() as cur:
            cur.execute(
                self._sql.release_notification,
                (tenant_key(tenant), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def notification(self, task_id: str, *, tenant: str | None = None) -> NotificationRecord | None:
        with self._d.read() as cur:
            r = cur.execute(self._sql.notification, (tenant_key(tenant), task_id)).fetchone()
        return None if r is None else self._notification(r)

    def list_notifications(self, *, limit: int = 1000) -> list[NotificationRecord]:
        with self._d.read() as cur:
            rows = cur.execute(self._sql.list_notifications, (limit,)).fetchall()
        return [self._notification(r) for r in rows]

    # Retention and result reuse (`conveyor.store.lifecycle`).

    def sweep_expired(
        self, *, now: datetime, tombstone_s: float | None, limit: int = 1000
    ) -> SweepReport:
        def run(statement: str, params: tuple[Any, ...]) -> int:
            with self._d.transaction() as cur:
                cur.execute(statement, params)
                return cur.rowcount

        return lifecycle.sweep(
            run, self._life, now=now, tombstone_s=tombstone_s, limit=limit, stamp=self._d.stamp
        )

    def reuse_begin(self, claims: Sequence[ReuseClaim], *, lease_s: float) -> list[ReuseLookup]:
        with self._d.transaction() as cur:
            return lifecycle.reuse_begin(
                cur, self._life, claims, now=utcnow(), lease_s=lease_s, stamp=self._d.stamp
            )

    def reuse_finish(self, entries: Sequence[ReuseEntry], released: Sequence[ReuseClaim]) -> None:
        with self._d.transaction() as cur:
            lifecycle.reuse_finish(
                cur, self._life, entries, released, now=utcnow(), stamp=self._d.stamp
            )

    # Variant runs (`conveyor.store.variantruns`).

    def record_variant_runs(self, runs: Sequence[VariantRun]) -> None:
        """Merge what events say about variant runs (conveyor.store.variantruns), one
        transaction."""
        if not runs:
            return
        with self._d.transaction() as cur:
            cur.executemany(self._run_upsert, [run_params(run, self._d.stamp) for run in runs])

    def variant_runs(self, *, kind: str | None = None) -> list[VariantRun]:
        """Every variant run (of `kind`), for `conveyor variants report`."""
        with self._d.read() as cur:
            if kind is None:
                rows = cur.execute(RUN_SELECT).fetchall()
            else:
                rows = cur.execute(f"{RUN_SELECT} WHERE kind = {self._d.p}", (kind,)).fetchall()
        return [run_from_row(row, self._d.time) for row in rows]

    # Row helpers.

    def _task(self, row: Sequence[Any]) -> TaskRecord:
        return task_from_row(row, self._d.time)

    def _required_time(self, value: Any) -> datetime:
        parsed = self._d.time(value)
        assert parsed is not None  # NOT NULL columns
        return parsed

    def _notification(self, r: Sequence[Any]) -> NotificationRecord:
        claimed_at, delivered_at = self._required_time(r[4]), self._d.time(r[6])
        return NotificationRecord(
            r[0], r[1], r[2], r[3], claimed_at, r[5], delivered_at, r[7] or None
        )

    def _task_row(self, cur: Cursor, task_id: str, tenant: str | None) -> Any:
        """The task's row: that tenant's, or without a tenant the one row of that id."""
        if tenant is not None:
            return cur.execute(self._sql.task_by_key, (tenant_key(tenant), task_id)).fetchone()
        rows = cur.execute(self._sql.tasks_by_id, (task_id,)).fetchall()
        if len(rows) > 1:
            tenants = cur.execute(self._sql.tenants_by_id, (task_id,)).fetchall()
            raise AmbiguousTaskError(task_id, sorted(t for (t,) in tenants))
        return rows[0] if rows else None

    def _rejected_owner(self, cur: Cursor, task_id: str, named: str) -> str:
        """Whose task a rejected record is a note of: the named tenant's task of that id, else
        the one task of that id (as before tenants were keys), else a new task of the named
        tenant."""
        rows = cur.execute(self._sql.tenants_by_id, (task_id,)).fetchall()
        owners = {str(t) for (t,) in rows}
        if named in owners or len(owners) != 1:
            return named
        return owners.pop()
