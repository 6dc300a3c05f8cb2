"""SQLite result store: the embedded default, one file shared by several processes.

Writeback writes while the gateway and the CLI read the same file, so the database runs in WAL
mode (readers never block the writer) with a busy timeout, and every write transaction starts with
`BEGIN IMMEDIATE`, which takes the write lock up front: the read-merge-write of `apply` can then
never interleave with another process's. One connection per store object, guarded by a lock, so a
store may be shared between threads. Timestamps are ISO-8601 UTC text with microseconds (fixed
width, so text order is time order). JSON columns hold text. `sqlite:///:memory:` gives a private
in-memory database for unit tests. "database is locked" and I/O faults raise `RetryableError`.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conveyor.errors import RetryableError
from conveyor.paths import private_file
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

_RUN_UPSERT = run_upsert("?")
_RUN_SCHEMA = run_schema("TEXT")  # variant runs (docs/variants.md)

# How long a statement waits for another process's write lock before failing as retryable.
# Writes hold the lock for milliseconds; 5 s absorbs bursts without stalling a stage for long.
BUSY_TIMEOUT_MS = 5000

# Messages of sqlite3.OperationalError that describe a transient condition, not a bug.
_TRANSIENT = ("locked", "busy", "disk i/o error", "unable to open database file")

# Keys include the tenant: a task is (tenant, task_id). `digest` identifies the gateway
# submission that reserved the row (not part of `TaskRecord`).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    tenant       TEXT NOT NULL DEFAULT '',
    task_id      TEXT NOT NULL,
    status       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    kind         TEXT,
    stage        TEXT,
    result       TEXT,
    verdict      TEXT CHECK (verdict IN ('allow', 'flag', 'block')),
    moderation   TEXT,
    trace_id     TEXT,
    error        TEXT,
    callback_url TEXT,
    completed_at TEXT,
    digest       TEXT,
    expires_at   TEXT,
    PRIMARY KEY (tenant, task_id)
);
CREATE INDEX IF NOT EXISTS tasks_status_idx ON tasks (status);
CREATE INDEX IF NOT EXISTS tasks_task_id_idx ON tasks (task_id);
CREATE INDEX IF NOT EXISTS tasks_tenant_status_idx ON tasks (tenant, status);
CREATE TABLE IF NOT EXISTS task_events (
    event_id TEXT PRIMARY KEY,
    tenant   TEXT NOT NULL DEFAULT '',
    task_id  TEXT NOT NULL,
    type     TEXT NOT NULL,
    status   TEXT NOT NULL,
    time     TEXT NOT NULL,
    stage    TEXT,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS task_events_task_time_idx ON task_events (tenant, task_id, time);
CREATE TABLE IF NOT EXISTS notifications (
    tenant       TEXT NOT NULL DEFAULT '',
    task_id      TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    status       TEXT NOT NULL,
    url          TEXT NOT NULL,
    claimed_at   TEXT NOT NULL,
    http_status  INTEGER,
    delivered_at TEXT,
    PRIMARY KEY (tenant, task_id)
);
CREATE TABLE IF NOT EXISTS batches (
    tenant            TEXT NOT NULL,
    batch_id          TEXT NOT NULL,
    status            TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    expires_at        TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    total             INTEGER NOT NULL,
    metadata          TEXT,
    ended_at          TEXT,
    error             TEXT,
    PRIMARY KEY (tenant, batch_id)
);
CREATE TABLE IF NOT EXISTS batch_items (
    tenant    TEXT NOT NULL,
    batch_id  TEXT NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    task_id   TEXT NOT NULL,
    PRIMARY KEY (tenant, batch_id, line)
);
CREATE INDEX IF NOT EXISTS batch_items_task_idx ON batch_items (tenant, task_id);
"""

# A database written before task ids were per tenant (no `digest` column) is migrated in place
# at open, in the schema transaction: its tables are renamed *_v1, the new ones created, the rows
# copied (a NULL tenant becomes "", an event or notification takes its task's tenant), and the
# old tables dropped. Old event ids (computed without the tenant) stay as they were.
_OLD_TABLES = ("tasks", "task_events", "notifications")
_OLD_INDEXES = ("tasks_status_idx", "task_events_task_time_idx")
_OWNER = "COALESCE((SELECT t.tenant FROM tasks_v1 t WHERE t.task_id = o.task_id), '')"
_V1_TASK_COLUMNS = tuple(c for c in TASK_COLUMNS if c not in ADDED_TASK_COLUMNS)
_MIGRATE = (
    f"INSERT INTO tasks ({', '.join(_V1_TASK_COLUMNS)}) SELECT "
    + ", ".join("COALESCE(tenant, '')" if c == "tenant" else c for c in _V1_TASK_COLUMNS)
    + " FROM tasks_v1",
    f"INSERT INTO task_events (tenant, {', '.join(EVENT_COLUMNS)}) SELECT {_OWNER}, "
    + ", ".join(f"o.{c}" for c in EVENT_COLUMNS)
    + " FROM task_events_v1 o ORDER BY o.rowid",
    f"INSERT INTO notifications ({', '.join(NOTIFICATION_COLUMNS)}) SELECT "
    + ", ".join(_OWNER if c == "tenant" else f"o.{c}" for c in NOTIFICATION_COLUMNS)
    + " FROM notifications_v1 o",
)

# Statuses a task is still in flight in (pending, processing, retrying).
_UNFINISHED = tuple(sorted(STATUSES - TERMINAL_STATUSES))
_KEY = "tenant = ? AND task_id = ?"
_TASK_SELECT = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks"
_TASK_UPSERT = (
    f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({', '.join('?' * len(TASK_COLUMNS))}) "
    "ON CONFLICT (tenant, task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in TASK_COLUMNS if c not in ("task_id", "tenant"))
)
_RESERVE = (
    "INSERT INTO tasks (tenant, task_id, status, created_at, updated_at, kind, callback_url, "
    "digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, task_id) DO NOTHING"
)
_RELEASE = (
    f"DELETE FROM tasks WHERE {_KEY} AND status = ? AND digest = ? "
    f"AND NOT EXISTS (SELECT 1 FROM task_events WHERE {_KEY})"
)
_EVENT_INSERT = (
    f"INSERT INTO task_events (tenant, {', '.join(EVENT_COLUMNS)}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)
# An unfinished claim older than the cutoff is taken over; without a lease the cutoff is
# datetime.min, which no claim predates.
_CLAIM = (
    "INSERT INTO notifications (tenant, task_id, event_id, status, url, claimed_at) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (tenant, task_id) DO UPDATE SET event_id = excluded.event_id, "
    "url = excluded.url, claimed_at = excluded.claimed_at "
    "WHERE notifications.status = ? AND notifications.claimed_at < ?"
)
_LIFECYCLE = lifecycle.lifecycle_sql("?")
_DISPATCH = dispatch.dispatch_sql("?", lock=None)  # BEGIN IMMEDIATE serialises claims

_BATCH_INSERT = (
    f"INSERT INTO batches ({', '.join(BATCH_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(BATCH_COLUMNS))})"
)
_BATCH_ITEM_INSERT = (
    "INSERT INTO batch_items (tenant, batch_id, line, custom_id, task_id) VALUES (?, ?, ?, ?, ?)"
)
_BATCH_SELECT = f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE tenant = ? AND batch_id = ?"
# A batch's items with their tasks: the reservation made the task row with the item, so the
# inner join loses none (results use a LEFT JOIN all the same, in case a row was removed).
_BATCH_JOIN = (
    "SELECT i.line, i.custom_id, i.task_id FROM batch_items i JOIN tasks t "
    "ON t.tenant = i.tenant AND t.task_id = i.task_id WHERE i.tenant = ? AND i.batch_id = ?"
)
_BATCH_COUNTS = (
    "SELECT t.status, COUNT(*) FROM batch_items i JOIN tasks t "
    "ON t.tenant = i.tenant AND t.task_id = i.task_id "
    "WHERE i.tenant = ? AND i.batch_id = ? GROUP BY t.status"
)
_BATCH_RESULTS = (
    "SELECT i.line, i.custom_id, i.task_id, "
    + ", ".join(f"t.{c}" for c in TASK_COLUMNS)
    + " FROM batch_items i LEFT JOIN tasks t ON t.tenant = i.tenant AND t.task_id = i.task_id "
    "WHERE i.tenant = ? AND i.batch_id = ? AND i.line > ? ORDER BY i.line LIMIT ?"
)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: object) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


def _as_dt(value: object) -> datetime:
    parsed = _dt(value)
    assert parsed is not None  # NOT NULL columns
    return parsed


class SqliteResultStore:
    """`ResultStore` on one SQLite file (or `:memory:`)."""

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            private_file(Path(path))  # results may be private; SQLite's -wal/-shm copy the mode
        self._path = path
        self._lock = threading.Lock()
        try:
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives power loss, since Kafka offsets are committed after it.
                self._conn.execute("PRAGMA synchronous = FULL")
            with self._transaction() as cur:
                old = _old_layout(cur)
                if old:
                    _rename_old(cur)
                for statement in (_SCHEMA + ";" + _RUN_SCHEMA).split(";"):
                    if statement.strip():
                        cur.execute(statement)
                if old:
                    _copy_old(cur, path)
                _add_columns(cur)
        except sqlite3.OperationalError as exc:
            if _transient(exc):
                raise RetryableError(f"sqlite: {exc}") from exc
            raise
        log.info("result store opened backend=sqlite path=%s", path)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction; the write lock is taken at BEGIN, not at the first write."""
        with self._lock, _mapped_errors():
            cur = self._conn.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.rollback()
                raise
            finally:
                cur.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        # Autocommit reads: each SELECT sees a consistent WAL snapshot without taking a lock.
        with self._lock, _mapped_errors():
            cur = self._conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def apply(self, update: TaskUpdate) -> bool:
        return self.apply_many([update])[0].new

    def apply_many(self, updates: Sequence[TaskUpdate]) -> list[Applied]:
        with self._transaction() as cur:
            return [self._apply_one(cur, update) for update in updates]

    def _apply_one(self, cur: sqlite3.Cursor, update: TaskUpdate) -> Applied:
        tenant = tenant_key(update.tenant)
        if update.rejected_record:  # its tenant is as untrustworthy as its key
            tenant = _rejected_owner(cur, update.task_id, tenant)
            update = dataclasses.replace(update, tenant=tenant or None)
        cur.execute(
            _EVENT_INSERT,
            (
                tenant,
                update.event_id,
                update.task_id,
                update.event_type,
                update.entry_status,
                _ts(update.time),
                update.stage,
                update.detail,
            ),
        )
        new = cur.rowcount == 1
        row = cur.execute(f"{_TASK_SELECT} WHERE {_KEY}", (tenant, update.task_id)).fetchone()
        current = None if row is None else task_from_row(row, _dt)
        if not new:
            log.debug(
                "duplicate event skipped task_id=%s event_id=%s", update.task_id, update.event_id
            )
            assert current is not None  # its event was recorded with the row, in one transaction
            return Applied(False, current)
        merged = merge_task(current, update)
        if merged is not current:
            cur.execute(_TASK_UPSERT, task_params(merged, _ts))
        return Applied(True, merged)

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord | None:
        with self._read() as cur:
            row = _task_row(cur, task_id, tenant)
        record = None if row is None else task_from_row(row, _dt)
        return None if record is None or record.expired(utcnow()) else record

    def timeline(self, task_id: str, *, tenant: str | None = None) -> list[TaskEventRecord]:
        with self._read() as cur:
            row = _task_row(cur, task_id, tenant)
            if row is None or task_from_row(row, _dt).expired(utcnow()):
                return []
            rows = cur.execute(
                f"SELECT {', '.join(EVENT_COLUMNS)} FROM task_events WHERE {_KEY} "
                "ORDER BY time, rowid",
                (row[TASK_COLUMNS.index("tenant")], task_id),
            ).fetchall()
        return [TaskEventRecord(r[0], r[1], r[2], r[3], _as_dt(r[4]), r[5], r[6]) for r in rows]

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
                _RESERVE,
                (*key, TaskStatus.PENDING, _ts(time), _ts(time), kind, callback_url, digest),
            )
            new = cur.rowcount == 1
            row = cur.execute(
                f"SELECT {', '.join(TASK_COLUMNS)}, digest FROM tasks WHERE {_KEY}", key
            ).fetchone()
        return Reservation(new, task_from_row(row[:-1], _dt), row[-1])

    def release(self, task_id: str, tenant: str, digest: str) -> bool:
        key = (tenant_key(tenant), task_id)
        with self._transaction() as cur:
            cur.execute(_RELEASE, (*key, TaskStatus.PENDING, digest, *key))
            return cur.rowcount == 1

    def count_by_status(self) -> dict[str, int]:
        with self._read() as cur:
            rows = cur.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({status: count for status, count in rows})
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
                _CLAIM,
                (
                    tenant_key(tenant),
                    task_id,
                    event_id,
                    claimed,
                    url,
                    _ts(now),
                    claimed,
                    _ts(cutoff),
                ),
            )
            return cur.rowcount == 1

    def complete_notification(
        self, task_id: str, http_status: int, *, tenant: str | None = None
    ) -> bool:
        status = NOTIFICATION_DELIVERED if 200 <= http_status < 400 else NOTIFICATION_REJECTED
        with self._transaction() as cur:
            cur.execute(
                "UPDATE notifications SET status = ?, http_status = ?, delivered_at = ? "
                f"WHERE {_KEY} AND status = ?",
                (
                    status,
                    http_status,
                    _ts(utcnow()),
                    tenant_key(tenant),
                    task_id,
                    NOTIFICATION_CLAIMED,
                ),
            )
            return cur.rowcount == 1

    def release_notification(self, task_id: str, *, tenant: str | None = None) -> bool:
        with self._transaction() as cur:
            cur.execute(
                f"DELETE FROM notifications WHERE {_KEY} AND status = ?",
                (tenant_key(tenant), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def notification(self, task_id: str, *, tenant: str | None = None) -> NotificationRecord | None:
        sql = f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications WHERE {_KEY}"
        with self._read() as cur:
            r = cur.execute(sql, (tenant_key(tenant), task_id)).fetchone()
        return None if r is None else _notification(r)

    def list_notifications(self, *, limit: int = 1000) -> list[NotificationRecord]:
        sql = (
            f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications "
            "ORDER BY claimed_at, task_id LIMIT ?"
        )
        with self._read() as cur:
            rows = cur.execute(sql, (limit,)).fetchall()
        return [_notification(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        log.info("result store closed backend=sqlite path=%s", self._path)

    def count_unfinished(self, tenant: str) -> int:
        """The tenant's tasks not yet in a terminal status (the gateway's in-flight quota)."""
        marks = ", ".join(["?"] * len(_UNFINISHED))
        sql = f"SELECT count(*) FROM tasks WHERE tenant = ? AND status IN ({marks})"
        with self._read() as cur:
            row = cur.execute(sql, (tenant_key(tenant), *_UNFINISHED)).fetchone()
        return int(row[0]) if row else 0

    def expired_at(self, task_id: str, *, tenant: str | None = None) -> datetime | None:
        with self._read() as cur:
            row = _task_row(cur, task_id, tenant)
        record = None if row is None else task_from_row(row, _dt)
        return record.expires_at if record is not None and record.expired(utcnow()) else None

    def sweep_expired(
        self, *, now: datetime, tombstone_s: float | None, limit: int = 1000
    ) -> SweepReport:
        def run(statement: str, params: tuple[Any, ...]) -> int:
            with self._transaction() as cur:
                cur.execute(statement, params)
                return cur.rowcount

        return lifecycle.sweep(
            run, _LIFECYCLE, now=now, tombstone_s=tombstone_s, limit=limit, stamp=_ts
        )

    def reuse_begin(self, claims: Sequence[ReuseClaim], *, lease_s: float) -> list[ReuseLookup]:
        with self._transaction() as cur:
            return lifecycle.reuse_begin(
                cur, _LIFECYCLE, claims, now=utcnow(), lease_s=lease_s, stamp=_ts
            )

    def reuse_finish(self, entries: Sequence[ReuseEntry], released: Sequence[ReuseClaim]) -> None:
        with self._transaction() as cur:
            lifecycle.reuse_finish(cur, _LIFECYCLE, entries, released, now=utcnow(), stamp=_ts)

    # Batches (`conveyor.store.batches`).

    def create_batch(self, batch: BatchRecord, items: Sequence[NewBatchItem]) -> None:
        tenant = tenant_key(batch.tenant)
        now = _ts(batch.created_at)
        with self._transaction() as cur:
            cur.execute(_BATCH_INSERT, batch_params(batch, _ts))
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
        with self._read() as cur:
            row = cur.execute(_BATCH_SELECT, (tenant_key(tenant), batch_id)).fetchone()
        return None if row is None else batch_from_row(row, _dt)

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
        marks = ", ".join("?" * len(expect))
        with self._transaction() as cur:
            cur.execute(
                "UPDATE batches SET status = ?, ended_at = COALESCE(?, ended_at), "
                "error = COALESCE(?, error) "
                f"WHERE tenant = ? AND batch_id = ? AND status IN ({marks})",
                (status, _ts(ended_at), error, tenant_key(tenant), batch_id, *expect),
            )
            return cur.rowcount == 1

    def batch_counts(self, tenant: str, batch_id: str) -> dict[str, int]:
        with self._read() as cur:
            rows = cur.execute(_BATCH_COUNTS, (tenant_key(tenant), batch_id)).fetchall()
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({status: count for status, count in rows})
        return counts

    def batch_unfinished(self, tenant: str, batch_id: str, *, limit: int) -> list[str]:
        marks = ", ".join("?" * len(TERMINAL_STATUSES))
        with self._read() as cur:
            rows = cur.execute(
                f"{_BATCH_JOIN} AND t.status NOT IN ({marks}) ORDER BY i.line LIMIT ?",
                (tenant_key(tenant), batch_id, *sorted(TERMINAL_STATUSES), limit),
            ).fetchall()
        return [str(r[2]) for r in rows]

    def batch_results(
        self, tenant: str, batch_id: str, *, after_line: int, limit: int
    ) -> list[tuple[BatchItem, TaskRecord | None]]:
        with self._read() as cur:
            rows = cur.execute(
                _BATCH_RESULTS, (tenant_key(tenant), batch_id, after_line, limit)
            ).fetchall()
        return [
            (BatchItem(r[0], r[1], r[2]), None if r[3] is None else task_from_row(r[3:], _dt))
            for r in rows
        ]

    def batch_of(self, task_id: str, *, tenant: str) -> str | None:
        with self._read() as cur:
            row = cur.execute(
                "SELECT batch_id FROM batch_items WHERE tenant = ? AND task_id = ?",
                (tenant_key(tenant), task_id),
            ).fetchone()
        return None if row is None else str(row[0])

    def overdue_batches(self, now: datetime, *, limit: int) -> list[BatchRecord]:
        with self._read() as cur:
            rows = cur.execute(
                f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE status = ? "
                "OR (status = ? AND expires_at <= ?) ORDER BY expires_at LIMIT ?",
                (BatchStatus.CANCELLING, BatchStatus.IN_PROGRESS, _ts(now), limit),
            ).fetchall()
        return [batch_from_row(row, _dt) for row in rows]

    def record_variant_runs(self, runs: Sequence[VariantRun]) -> None:
        """Merge what events say about variant runs (conveyor.store.variantruns), one
        transaction."""
        if not runs:
            return
        with self._transaction() as cur:
            cur.executemany(_RUN_UPSERT, [run_params(run, _ts) for run in runs])

    def variant_runs(self, *, kind: str | None = None) -> list[VariantRun]:
        """Every variant run (of `kind`), for `conveyor variants report`."""
        with self._read() as cur:
            if kind is None:
                rows = cur.execute(RUN_SELECT).fetchall()
            else:
                rows = cur.execute(RUN_SELECT + " WHERE kind = ?", (kind,)).fetchall()
        return [run_from_row(row, _dt) for row in rows]

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
                stamp=_ts,
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
            return dispatch.stop(cur, _DISPATCH, tenant_key(tenant), batch_id, now=now, stamp=_ts)

    def list_batches(
        self, tenant: str, *, limit: int, after: str | None = None
    ) -> list[BatchRecord]:
        cursor = None if after is None else self.get_batch(tenant, after)
        if after is not None and cursor is None:
            return []
        with self._read() as cur:
            rows = dispatch.list_batches(
                cur, _DISPATCH, tenant_key(tenant), limit=limit, after=cursor, stamp=_ts
            )
        return [batch_from_row(row, _dt) for row in rows]


def _transient(exc: sqlite3.Error) -> bool:
    message = str(exc).lower()
    return isinstance(exc, sqlite3.OperationalError) and any(t in message for t in _TRANSIENT)


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """Re-raise transient SQLite faults as `RetryableError`; anything else is a bug, as is."""
    try:
        yield
    except sqlite3.Error as exc:
        if _transient(exc):
            raise RetryableError(f"sqlite: {exc}") from exc
        raise


def _notification(r: Sequence[Any]) -> NotificationRecord:
    return NotificationRecord(r[0], r[1], r[2], r[3], _as_dt(r[4]), r[5], _dt(r[6]), r[7] or None)


def _task_row(cur: sqlite3.Cursor, task_id: str, tenant: str | None) -> Any:
    """The task's row: that tenant's, or without a tenant the one row of that id."""
    if tenant is not None:
        return cur.execute(f"{_TASK_SELECT} WHERE {_KEY}", (tenant_key(tenant), task_id)).fetchone()
    rows = cur.execute(f"{_TASK_SELECT} WHERE task_id = ? LIMIT 2", (task_id,)).fetchall()
    if len(rows) > 1:
        tenants = cur.execute("SELECT tenant FROM tasks WHERE task_id = ?", (task_id,)).fetchall()
        raise AmbiguousTaskError(task_id, sorted(t for (t,) in tenants))
    return rows[0] if rows else None


def _rejected_owner(cur: sqlite3.Cursor, task_id: str, named: str) -> str:
    """Whose task a rejected record is a note of: the named tenant's task of that id, else the
    one task of that id (as before tenants were keys), else a new task of the named tenant."""
    rows = cur.execute("SELECT tenant FROM tasks WHERE task_id = ?", (task_id,)).fetchall()
    owners = {str(t) for (t,) in rows}
    if named in owners or len(owners) != 1:
        return named
    return owners.pop()


def _add_columns(cur: sqlite3.Cursor) -> None:
    """Columns and tables added since the per-tenant layout (additive: old rows keep NULLs)."""
    columns = {r[1] for r in cur.execute("PRAGMA table_info(tasks)").fetchall()}
    for name in ADDED_TASK_COLUMNS:
        if name not in columns:
            cur.execute(f"ALTER TABLE tasks ADD COLUMN {name} TEXT")
    cur.execute(lifecycle.REUSE_TABLE.format(text="TEXT", time="TEXT"))
    for statement in lifecycle.ADDED_INDEXES:
        cur.execute(statement)
    for statement in dispatch.schema("TEXT", "TEXT"):
        cur.execute(statement)


def _old_layout(cur: sqlite3.Cursor) -> bool:
    columns = [r[1] for r in cur.execute("PRAGMA table_info(tasks)").fetchall()]
    return bool(columns) and "digest" not in columns


def _rename_old(cur: sqlite3.Cursor) -> None:
    for index in _OLD_INDEXES:
        cur.execute(f"DROP INDEX IF EXISTS {index}")
    for table in _OLD_TABLES:
        cur.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")


def _copy_old(cur: sqlite3.Cursor, path: str) -> None:
    for statement in _MIGRATE:
        cur.execute(statement)
    for table in _OLD_TABLES:
        cur.execute(f"DROP TABLE {table}_v1")
    log.warning("result store migrated to per-tenant task keys backend=sqlite path=%s", path)
