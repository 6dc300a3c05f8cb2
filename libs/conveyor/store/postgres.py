"""PostgreSQL result store (psycopg 3): the production backend.

One connection per store object (autocommit off, guarded by a lock), one transaction per call.
`apply` inserts the event with `INSERT ... ON CONFLICT (event_id) DO NOTHING` (a duplicate ends
the call), locks the task row with `SELECT ... FOR UPDATE`, merges in Python with the same pure
`merge_task` the SQLite backend uses, and writes the row back; two writers racing to create the
same task are resolved by `ON CONFLICT (tenant, task_id) DO NOTHING` and a second locked read;
tasks are keyed by (tenant, task id), and `reserve` is the same `ON CONFLICT DO NOTHING`. Timestamps
are `timestamptz` (read back as UTC), JSON columns are text so both backends store the same bytes,
and `task_events.seq` (identity) orders timeline ties by arrival. The schema is created at open
under an advisory lock, so services starting together do not race on `CREATE TABLE IF NOT
EXISTS`. Connection loss, admin shutdown, lock timeouts, serialization failures and deadlocks
raise `RetryableError`; a broken connection is replaced on the next call.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from conveyor.errors import RetryableError
from conveyor.store import dispatch, lifecycle
from conveyor.store.base import (
    ADDED_TASK_COLUMNS,
    EVENT_COLUMNS,
    NOTIFICATION_CLAIMED,
    NOTIFICATION_COLUMNS,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_REJECTED,
    STATUSES,
    TASK_COLUMNS,
    TERMINAL_STATUSES,
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
from conveyor.store.batches import (
    BATCH_COLUMNS,
    BatchConflictError,
    BatchItem,
    BatchRecord,
    BatchStatus,
    NewBatchItem,
    batch_from_row,
    batch_params,
)
from conveyor.store.variantruns import (
    RUN_SELECT,
    VariantRun,
    run_from_row,
    run_params,
    run_schema,
    run_upsert,
)

log = logging.getLogger(__name__)

_RUN_UPSERT = run_upsert("%s")
_RUN_SCHEMA = run_schema("timestamptz")

# Bounds how long open (and a reconnect) waits for an unreachable server before failing retryable.
CONNECT_TIMEOUT_S = 10
# Any key will do as long as every Conveyor process uses the same one for schema creation.
_SCHEMA_LOCK_KEY = 0x436F6E76  # "Conv"

# Keys include the tenant: a task is (tenant, task_id). `digest` identifies the gateway
# submission that reserved the row (not part of `TaskRecord`).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    tenant       text NOT NULL DEFAULT '',
    task_id      text NOT NULL,
    status       text NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    kind         text,
    stage        text,
    result       text,
    verdict      text CHECK (verdict IN ('allow', 'flag', 'block')),
    moderation   text,
    trace_id     text,
    error        text,
    callback_url text,
    completed_at timestamptz,
    digest       text,
    expires_at   timestamptz,
    PRIMARY KEY (tenant, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_status_idx ON tasks (status);
CREATE INDEX IF NOT EXISTS tasks_task_id_idx ON tasks (task_id);
CREATE INDEX IF NOT EXISTS tasks_tenant_status_idx ON tasks (tenant, status);
CREATE TABLE IF NOT EXISTS task_events (
    event_id text PRIMARY KEY,
    tenant   text NOT NULL DEFAULT '',
    task_id  text NOT NULL,
    type     text NOT NULL,
    status   text NOT NULL,
    time     timestamptz NOT NULL,
    stage    text,
    detail   text,
    seq      bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS task_events_task_time_idx ON task_events (tenant, task_id, time, seq);
CREATE TABLE IF NOT EXISTS notifications (
    tenant       text NOT NULL DEFAULT '',
    task_id      text NOT NULL,
    event_id     text NOT NULL,
    status       text NOT NULL,
    url          text NOT NULL,
    claimed_at   timestamptz NOT NULL,
    http_status  integer,
    delivered_at timestamptz,
    PRIMARY KEY (tenant, task_id)
);
CREATE TABLE IF NOT EXISTS batches (
    tenant            text NOT NULL,
    batch_id          text NOT NULL,
    status            text NOT NULL,
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    completion_window text NOT NULL,
    total             integer NOT NULL,
    metadata          text,
    ended_at          timestamptz,
    error             text,
    PRIMARY KEY (tenant, batch_id)
);
CREATE TABLE IF NOT EXISTS batch_items (
    tenant    text NOT NULL,
    batch_id  text NOT NULL,
    line      integer NOT NULL,
    custom_id text NOT NULL,
    task_id   text NOT NULL,
    PRIMARY KEY (tenant, batch_id, line)
);
CREATE INDEX IF NOT EXISTS batch_items_task_idx ON batch_items (tenant, task_id)
"""

# A database written before task ids were per tenant (`tasks` without `digest`) is migrated in
# place at open, in the schema transaction under the advisory lock: its tables are renamed *_v1,
# the new ones created, the rows copied (a NULL tenant becomes "", an event or notification takes
# its task's tenant; events in arrival order) and the old tables dropped. Old event ids stay.
_OLD_TABLES = ("tasks", "task_events", "notifications")
_OLD_INDEXES = ("tasks_status_idx", "task_events_task_time_idx")
_OLD_LAYOUT = (
    "SELECT count(*) FILTER (WHERE column_name = 'digest'), count(*) "
    "FROM information_schema.columns WHERE table_schema = current_schema() "
    "AND table_name = 'tasks'"
)
_OWNER = "COALESCE((SELECT t.tenant FROM tasks_v1 t WHERE t.task_id = o.task_id), '')"
_V1_TASK_COLUMNS = tuple(c for c in TASK_COLUMNS if c not in ADDED_TASK_COLUMNS)
_MIGRATE = (
    f"INSERT INTO tasks ({', '.join(_V1_TASK_COLUMNS)}) SELECT "
    + ", ".join("COALESCE(tenant, '')" if c == "tenant" else c for c in _V1_TASK_COLUMNS)
    + " FROM tasks_v1",
    f"INSERT INTO task_events (tenant, {', '.join(EVENT_COLUMNS)}) SELECT {_OWNER}, "
    + ", ".join(f"o.{c}" for c in EVENT_COLUMNS)
    + " FROM task_events_v1 o ORDER BY o.seq",
    f"INSERT INTO notifications ({', '.join(NOTIFICATION_COLUMNS)}) SELECT "
    + ", ".join(_OWNER if c == "tenant" else f"o.{c}" for c in NOTIFICATION_COLUMNS)
    + " FROM notifications_v1 o",
)

# Statuses a task is still in flight in (pending, processing, retrying).
_UNFINISHED = tuple(sorted(STATUSES - TERMINAL_STATUSES))
_KEY = "tenant = %s AND task_id = %s"
_TASK_SELECT = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks"
_TASK_INSERT = (
    f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(TASK_COLUMNS))}) ON CONFLICT (tenant, task_id) DO NOTHING"
)
_UPDATED = tuple(c for c in TASK_COLUMNS if c not in ("task_id", "tenant"))
_TASK_UPDATE = "UPDATE tasks SET " + ", ".join(f"{c} = %s" for c in _UPDATED) + f" WHERE {_KEY}"
_RESERVE = (
    "INSERT INTO tasks (tenant, task_id, status, created_at, updated_at, kind, callback_url, "
    "digest) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, task_id) DO NOTHING"
)
_RELEASE = (
    f"DELETE FROM tasks WHERE {_KEY} AND status = %s AND digest = %s "
    f"AND NOT EXISTS (SELECT 1 FROM task_events WHERE {_KEY})"
)
_EVENT_INSERT = (
    f"INSERT INTO task_events (tenant, {', '.join(EVENT_COLUMNS)}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING"
)
# An unfinished claim older than the cutoff is taken over; without a lease the cutoff is
# datetime.min, which no claim predates.
_CLAIM = (
    "INSERT INTO notifications (tenant, task_id, event_id, status, url, claimed_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, task_id) DO UPDATE SET "
    "event_id = excluded.event_id, url = excluded.url, claimed_at = excluded.claimed_at "
    "WHERE notifications.status = %s AND notifications.claimed_at < %s"
)
_LIFECYCLE = lifecycle.lifecycle_sql("%s")
_DISPATCH = dispatch.dispatch_sql("%s", lock="SELECT pg_advisory_xact_lock(%s)")

# Faults a later attempt can get past: connection/server trouble and lost concurrency races.
_TRANSIENT: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.TransactionRollback,
)

_BATCH_INSERT = (
    f"INSERT INTO batches ({', '.join(BATCH_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(BATCH_COLUMNS))})"
)
_BATCH_ITEM_INSERT = (
    "INSERT INTO batch_items (tenant, batch_id, line, custom_id, task_id) "
    "VALUES (%s, %s, %s, %s, %s)"
)
_BATCH_SELECT = (
    f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE tenant = %s AND batch_id = %s"
)
_BATCH_JOIN = (
    "SELECT i.line, i.custom_id, i.task_id FROM batch_items i JOIN tasks t "
    "ON t.tenant = i.tenant AND t.task_id = i.task_id WHERE i.tenant = %s AND i.batch_id = %s"
)
_BATCH_COUNTS = (
    "SELECT t.status, count(*) FROM batch_items i JOIN tasks t "
    "ON t.tenant = i.tenant AND t.task_id = i.task_id "
    "WHERE i.tenant = %s AND i.batch_id = %s GROUP BY t.status"
)
_BATCH_RESULTS = (
    "SELECT i.line, i.custom_id, i.task_id, "
    + ", ".join(f"t.{c}" for c in TASK_COLUMNS)
    + " FROM batch_items i LEFT JOIN tasks t ON t.tenant = i.tenant AND t.task_id = i.task_id "
    "WHERE i.tenant = %s AND i.batch_id = %s AND i.line > %s ORDER BY i.line LIMIT %s"
)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _as_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class PostgresResultStore:
    """`ResultStore` on a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            with_digest, columns = cur.execute(_OLD_LAYOUT).fetchone() or (0, 0)
            old = columns > 0 and with_digest == 0
            if old:
                _rename_old(cur)
            for statement in _SCHEMA.split(";"):
                cur.execute(statement)
            for statement in _RUN_SCHEMA.split(";"):  # variant runs (docs/variants.md)
                cur.execute(statement)
            if old:
                for statement in _MIGRATE:
                    cur.execute(statement)
                for table in _OLD_TABLES:
                    cur.execute(f"DROP TABLE {table}_v1")
                log.warning("result store migrated to per-tenant task keys backend=postgresql")
            # Added since the per-tenant layout (additive: old rows keep NULLs).
            for name in ADDED_TASK_COLUMNS:
                cur.execute(f"ALTER TABLE tasks ADD COLUMN IF NOT EXISTS {name} timestamptz")
            cur.execute(lifecycle.REUSE_TABLE.format(text="text", time="timestamptz"))
            for statement in lifecycle.ADDED_INDEXES:
                cur.execute(statement)
            for statement in dispatch.schema("text", "timestamptz"):
                cur.execute(statement)
        log.info("result store opened backend=postgresql")

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            log.warning("result store reconnecting backend=postgresql")
            self._conn.close()
        self._conn = psycopg.connect(
            self._url,
            autocommit=False,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="conveyor",
        )
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on the (re)connected connection; transient faults become retryable."""
        with self._lock:
            if self._closed:
                raise RuntimeError("result store is closed")  # a bug, not a transient fault
            try:
                conn = self._connection()
                try:
                    with conn.cursor() as cur:
                        yield cur
                    conn.commit()
                except BaseException:
                    if not conn.closed and not conn.broken:
                        conn.rollback()
                    raise
            except _TRANSIENT as exc:
                raise RetryableError(f"postgresql: {type(exc).__name__}: {exc}") from exc

    def apply(self, update: TaskUpdate) -> bool:
        return self.apply_many([update])[0].new

    def apply_many(self, updates: Sequence[TaskUpdate]) -> list[Applied]:
        with self._transaction() as cur:
            return [self._apply_one(cur, update) for update in updates]

    def _apply_one(self, cur: psycopg.Cursor[Any], update: TaskUpdate) -> Applied:
        tenant = tenant_key(update.tenant)
        if update.rejected_record:  # its tenant is as untrustworthy as its key
            tenant = _rejected_owner(cur, update.task_id, tenant)
            update = dataclasses.replace(update, tenant=tenant or None)
        key = (tenant, update.task_id)
        cur.execute(
            _EVENT_INSERT,
            (
                tenant,
                update.event_id,
                update.task_id,
                update.event_type,
                update.entry_status,
                update.time,
                update.stage,
                update.detail,
            ),
        )
        if cur.rowcount == 0:
            log.debug(
                "duplicate event skipped task_id=%s event_id=%s", update.task_id, update.event_id
            )
            row = cur.execute(f"{_TASK_SELECT} WHERE {_KEY}", key).fetchone()
            assert row is not None  # its event was recorded with the row, in one transaction
            return Applied(False, task_from_row(row, _utc))
        # Two rounds at most: the first may lose a race to insert the row, the second then finds
        # it (committed) and locks it.
        for _ in range(2):
            row = cur.execute(f"{_TASK_SELECT} WHERE {_KEY} FOR UPDATE", key).fetchone()
            current = None if row is None else task_from_row(row, _utc)
            merged = merge_task(current, update)
            if current is not None:
                if merged is not current:
                    params = dict(zip(TASK_COLUMNS, task_params(merged, _utc), strict=True))
                    cur.execute(_TASK_UPDATE, (*(params[c] for c in _UPDATED), *key))
                return Applied(True, merged)
            cur.execute(_TASK_INSERT, task_params(merged, _utc))
            if cur.rowcount == 1:
                return Applied(True, merged)
        raise RetryableError(f"task row contention task_id={update.task_id}")

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord | None:
        with self._transaction() as cur:
            row = _task_row(cur, task_id, tenant)
        record = None if row is None else task_from_row(row, _utc)
        return None if record is None or record.expired(utcnow()) else record

    def timeline(self, task_id: str, *, tenant: str | None = None) -> list[TaskEventRecord]:
        with self._transaction() as cur:
            row = _task_row(cur, task_id, tenant)
            if row is None or task_from_row(row, _utc).expired(utcnow()):
                return []
            rows = cur.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM task_events WHERE {_KEY} "
                "ORDER BY time, seq",
                (row[TASK_COLUMNS.index("tenant")], task_id),
            ).fetchall()
        return [TaskEventRecord(r[0], r[1], r[2], r[3], _as_utc(r[4]), r[5], r[6]) for r in rows]

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
        with self._transaction() as cur:
            cur.execute(
                _RESERVE, (*key, TaskStatus.PENDING, time, time, kind, callback_url, digest)
            )
            new = cur.rowcount == 1
            row = cur.execute(
                f"SELECT {', '.join(TASK_COLUMNS)}, digest FROM tasks WHERE {_KEY}", key
            ).fetchone()
        # Not found only if a concurrent release dropped it between the two statements.
        if row is None:
            raise RetryableError(f"reservation of task {task_id} released concurrently")
        return Reservation(new, task_from_row(row[:-1], _utc), row[-1])

    def release(self, task_id: str, tenant: str, digest: str) -> bool:
        key = (tenant_key(tenant), task_id)
        with self._transaction() as cur:
            cur.execute(_RELEASE, (*key, TaskStatus.PENDING, digest, *key))
            return cur.rowcount == 1

    def count_by_status(self) -> dict[str, int]:
        with self._transaction() as cur:
            rows = cur.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({status: int(count) for status, count in rows})
        return counts

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
        with self._transaction() as cur:
            cur.execute(
                _CLAIM, (tenant_key(tenant), task_id, event_id, claimed, url, now, claimed, cutoff)
            )
            return cur.rowcount == 1

    def complete_notification(
        self, task_id: str, http_status: int, *, tenant: str | None = None
    ) -> bool:
        status = NOTIFICATION_DELIVERED if 200 <= http_status < 400 else NOTIFICATION_REJECTED
        with self._transaction() as cur:
            cur.execute(
                "UPDATE notifications SET status = %s, http_status = %s, delivered_at = %s "
                f"WHERE {_KEY} AND status = %s",
                (status, http_status, utcnow(), tenant_key(tenant), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def release_notification(self, task_id: str, *, tenant: str | None = None) -> bool:
        with self._transaction() as cur:
            cur.execute(
                f"DELETE FROM notifications WHERE {_KEY} AND status = %s",
                (tenant_key(tenant), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def notification(self, task_id: str, *, tenant: str | None = None) -> NotificationRecord | None:
        sql = f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications WHERE {_KEY}"
        with self._transaction() as cur:
            r = cur.execute(sql, (tenant_key(tenant), task_id)).fetchone()
        return None if r is None else _notification(r)

    def list_notifications(self, *, limit: int = 1000) -> list[NotificationRecord]:
        sql = (
            f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications "
            "ORDER BY claimed_at, task_id LIMIT %s"
        )
        with self._transaction() as cur:
            rows = cur.execute(sql, (limit,)).fetchall()
        return [_notification(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
        log.info("result store closed backend=postgresql")

    def count_unfinished(self, tenant: str) -> int:
        """The tenant's tasks not yet in a terminal status (the gateway's in-flight quota)."""
        marks = ", ".join(["%s"] * len(_UNFINISHED))
        sql = f"SELECT count(*) FROM tasks WHERE tenant = %s AND status IN ({marks})"
        with self._transaction() as cur:
            row = cur.execute(sql, (tenant_key(tenant), *_UNFINISHED)).fetchone()
        return int(row[0]) if row else 0

    def expired_at(self, task_id: str, *, tenant: str | None = None) -> datetime | None:
        with self._transaction() as cur:
            row = _task_row(cur, task_id, tenant)
        record = None if row is None else task_from_row(row, _utc)
        return record.expires_at if record is not None and record.expired(utcnow()) else None

    def sweep_expired(
        self, *, now: datetime, tombstone_s: float | None, limit: int = 1000
    ) -> SweepReport:
        def run(statement: str, params: tuple[Any, ...]) -> int:
            with self._transaction() as cur:
                cur.execute(statement, params)
                return cur.rowcount

        return lifecycle.sweep(
            run, _LIFECYCLE, now=now, tombstone_s=tombstone_s, limit=limit, stamp=_as_utc
        )

    def reuse_begin(self, claims: Sequence[ReuseClaim], *, lease_s: float) -> list[ReuseLookup]:
        with self._transaction() as cur:
            return lifecycle.reuse_begin(
                cur, _LIFECYCLE, claims, now=utcnow(), lease_s=lease_s, stamp=_as_utc
            )

    def reuse_finish(self, entries: Sequence[ReuseEntry], released: Sequence[ReuseClaim]) -> None:
        with self._transaction() as cur:
            lifecycle.reuse_finish(cur, _LIFECYCLE, entries, released, now=utcnow(), stamp=_as_utc)

    # Batches (`conveyor.store.batches`).

    def create_batch(self, batch: BatchRecord, items: Sequence[NewBatchItem]) -> None:
        tenant = tenant_key(batch.tenant)
        now = batch.created_at
        with self._transaction() as cur:
            cur.execute(_BATCH_INSERT, batch_params(batch, _utc))
            cur.executemany(
                _BATCH_ITEM_INSERT,
                [
                    (tenant, batch.batch_id, n.item.line, n.item.custom_id, n.item.task_id)
                    for n in items
                ],
            )
            cur.executemany(
                _RESERVE,
                [
                    (
                        tenant,
                        n.item.task_id,
                        TaskStatus.PENDING,
                        now,
                        now,
                        n.kind,
                        n.callback_url,
                        n.digest,
                    )
                    for n in items
                ],
            )
            if cur.rowcount != len(items):  # rolled back with the batch
                raise BatchConflictError(f"a task id of batch {batch.batch_id} is taken")
            dispatch.insert(cur, _DISPATCH, tenant, batch.batch_id, items)

    def get_batch(self, tenant: str, batch_id: str) -> BatchRecord | None:
        with self._transaction() as cur:
            row = cur.execute(_BATCH_SELECT, (tenant_key(tenant), batch_id)).fetchone()
        return None if row is None else batch_from_row(row, _utc)

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
        with self._transaction() as cur:
            cur.execute(
                "UPDATE batches SET status = %s, ended_at = COALESCE(%s, ended_at), "
                "error = COALESCE(%s, error) "
                "WHERE tenant = %s AND batch_id = %s AND status = ANY(%s)",
                (status, ended_at, error, tenant_key(tenant), batch_id, list(expect)),
            )
            return cur.rowcount == 1

    def batch_counts(self, tenant: str, batch_id: str) -> dict[str, int]:
        with self._transaction() as cur:
            rows = cur.execute(_BATCH_COUNTS, (tenant_key(tenant), batch_id)).fetchall()
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({status: int(count) for status, count in rows})
        return counts

    def batch_unfinished(self, tenant: str, batch_id: str, *, limit: int) -> list[str]:
        with self._transaction() as cur:
            rows = cur.execute(
                f"{_BATCH_JOIN} AND NOT (t.status = ANY(%s)) ORDER BY i.line LIMIT %s",
                (tenant_key(tenant), batch_id, sorted(TERMINAL_STATUSES), limit),
            ).fetchall()
        return [str(r[2]) for r in rows]

    def batch_results(
        self, tenant: str, batch_id: str, *, after_line: int, limit: int
    ) -> list[tuple[BatchItem, TaskRecord | None]]:
        with self._transaction() as cur:
            rows = cur.execute(
                _BATCH_RESULTS, (tenant_key(tenant), batch_id, after_line, limit)
            ).fetchall()
        return [
            (BatchItem(r[0], r[1], r[2]), None if r[3] is None else task_from_row(r[3:], _utc))
            for r in rows
        ]

    def batch_of(self, task_id: str, *, tenant: str) -> str | None:
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT batch_id FROM batch_items WHERE tenant = %s AND task_id = %s",
                (tenant_key(tenant), task_id),
            ).fetchone()
        return None if row is None else str(row[0])

    def overdue_batches(self, now: datetime, *, limit: int) -> list[BatchRecord]:
        with self._transaction() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE status = %s "
                "OR (status = %s AND expires_at <= %s) ORDER BY expires_at LIMIT %s",
                (BatchStatus.CANCELLING, BatchStatus.IN_PROGRESS, now, limit),
            ).fetchall()
        return [batch_from_row(row, _utc) for row in rows]

    def record_variant_runs(self, runs: Sequence[VariantRun]) -> None:
        """Merge what events say about variant runs (conveyor.store.variantruns), one
        transaction."""
        if not runs:
            return
        with self._transaction() as cur:
            cur.executemany(_RUN_UPSERT, [run_params(run, _utc) for run in runs])

    def variant_runs(self, *, kind: str | None = None) -> list[VariantRun]:
        """Every variant run (of `kind`), for `conveyor variants report`."""
        with self._transaction() as cur:
            if kind is None:
                rows = cur.execute(RUN_SELECT).fetchall()
            else:
                rows = cur.execute(RUN_SELECT + " WHERE kind = %s", (kind,)).fetchall()
        return [run_from_row(row, _utc) for row in rows]

    # Paced batch dispatch and the batch list (`conveyor.store.dispatch`).

    def claim_dispatch(
        self, *, window: int | None, lease_s: float, now: datetime, min_free: int = 1
    ) -> list[dispatch.DispatchItem]:
        with self._transaction() as cur:
            return dispatch.claim(
                cur,
                _DISPATCH,
                window=window,
                lease_s=lease_s,
                now=now,
                stamp=_as_utc,
                min_free=min_free,
            )

    def finish_dispatch(
        self,
        *,
        dispatched: Sequence[dispatch.DispatchItem],
        done: Sequence[dispatch.DispatchItem] = (),
        released: Sequence[dispatch.DispatchItem] = (),
    ) -> None:
        with self._transaction() as cur:
            dispatch.finish(cur, _DISPATCH, dispatched=dispatched, done=done, released=released)

    def stop_dispatch(self, tenant: str, batch_id: str, *, now: datetime) -> list[str]:
        with self._transaction() as cur:
            return dispatch.stop(
                cur, _DISPATCH, tenant_key(tenant), batch_id, now=now, stamp=_as_utc
            )

    def list_batches(
        self, tenant: str, *, limit: int, after: str | None = None
    ) -> list[BatchRecord]:
        cursor = None if after is None else self.get_batch(tenant, after)
        if after is not None and cursor is None:
            return []
        with self._transaction() as cur:
            rows = dispatch.list_batches(
                cur, _DISPATCH, tenant_key(tenant), limit=limit, after=cursor, stamp=_as_utc
            )
        return [batch_from_row(row, _utc) for row in rows]


def _notification(r: Sequence[Any]) -> NotificationRecord:
    return NotificationRecord(r[0], r[1], r[2], r[3], _as_utc(r[4]), r[5], _utc(r[6]), r[7] or None)


def _task_row(cur: psycopg.Cursor[Any], task_id: str, tenant: str | None) -> Any:
    """The task's row: that tenant's, or without a tenant the one row of that id."""
    if tenant is not None:
        return cur.execute(f"{_TASK_SELECT} WHERE {_KEY}", (tenant_key(tenant), task_id)).fetchone()
    rows = cur.execute(f"{_TASK_SELECT} WHERE task_id = %s LIMIT 2", (task_id,)).fetchall()
    if len(rows) > 1:
        tenants = cur.execute("SELECT tenant FROM tasks WHERE task_id = %s", (task_id,)).fetchall()
        raise AmbiguousTaskError(task_id, sorted(t for (t,) in tenants))
    return rows[0] if rows else None


def _rejected_owner(cur: psycopg.Cursor[Any], task_id: str, named: str) -> str:
    """Whose task a rejected record is a note of: the named tenant's task of that id, else the
    one task of that id (as before tenants were keys), else a new task of the named tenant."""
    rows = cur.execute("SELECT tenant FROM tasks WHERE task_id = %s", (task_id,)).fetchall()
    owners = {str(t) for (t,) in rows}
    if named in owners or len(owners) != 1:
        return named
    return owners.pop()


def _rename_old(cur: psycopg.Cursor[Any]) -> None:
    for index in _OLD_INDEXES:
        cur.execute(f"DROP INDEX IF EXISTS {index}")
    for table in _OLD_TABLES:
        cur.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
