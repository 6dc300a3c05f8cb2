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

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conveyor.errors import RetryableError
from conveyor.paths import private_file
from conveyor.store.base import (
    EVENT_COLUMNS,
    NOTIFICATION_CLAIMED,
    NOTIFICATION_COLUMNS,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_REJECTED,
    STATUSES,
    TASK_COLUMNS,
    NotificationRecord,
    TaskEventRecord,
    TaskRecord,
    TaskUpdate,
    merge_task,
    task_from_row,
    task_params,
    utcnow,
)

log = logging.getLogger(__name__)

# How long a statement waits for another process's write lock before failing as retryable.
# Writes hold the lock for milliseconds; 5 s absorbs bursts without stalling a stage for long.
BUSY_TIMEOUT_MS = 5000

# Messages of sqlite3.OperationalError that describe a transient condition, not a bug.
_TRANSIENT = ("locked", "busy", "disk i/o error", "unable to open database file")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id      TEXT PRIMARY KEY,
    status       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    tenant       TEXT,
    kind         TEXT,
    stage        TEXT,
    result       TEXT,
    verdict      TEXT CHECK (verdict IN ('allow', 'flag', 'block')),
    moderation   TEXT,
    trace_id     TEXT,
    error        TEXT,
    callback_url TEXT,
    completed_at TEXT
);
CREATE INDEX IF NOT EXISTS tasks_status_idx ON tasks (status);
CREATE TABLE IF NOT EXISTS task_events (
    event_id TEXT PRIMARY KEY,
    task_id  TEXT NOT NULL,
    type     TEXT NOT NULL,
    status   TEXT NOT NULL,
    time     TEXT NOT NULL,
    stage    TEXT,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS task_events_task_time_idx ON task_events (task_id, time);
CREATE TABLE IF NOT EXISTS notifications (
    task_id      TEXT PRIMARY KEY,
    event_id     TEXT NOT NULL,
    status       TEXT NOT NULL,
    url          TEXT NOT NULL,
    claimed_at   TEXT NOT NULL,
    http_status  INTEGER,
    delivered_at TEXT
);
"""

_TASK_SELECT = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks"
_TASK_UPSERT = (
    f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({', '.join('?' * len(TASK_COLUMNS))}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in TASK_COLUMNS[1:])
)
_EVENT_INSERT = (
    f"INSERT INTO task_events ({', '.join(EVENT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id) DO NOTHING"
)
# An unfinished claim older than the cutoff is taken over; without a lease the cutoff is
# datetime.min, which no claim predates.
_CLAIM = (
    f"INSERT INTO notifications ({', '.join(NOTIFICATION_COLUMNS[:5])}) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET event_id = excluded.event_id, url = excluded.url, "
    "claimed_at = excluded.claimed_at "
    "WHERE notifications.status = ? AND notifications.claimed_at < ?"
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
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        cur.execute(statement)
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
        return self.apply_many([update])[0]

    def apply_many(self, updates: Sequence[TaskUpdate]) -> list[bool]:
        with self._transaction() as cur:
            return [self._apply_one(cur, update) for update in updates]

    def _apply_one(self, cur: sqlite3.Cursor, update: TaskUpdate) -> bool:
        cur.execute(
            _EVENT_INSERT,
            (
                update.event_id,
                update.task_id,
                update.event_type,
                update.status,
                _ts(update.time),
                update.stage,
                update.detail,
            ),
        )
        if cur.rowcount == 0:
            log.debug(
                "duplicate event skipped task_id=%s event_id=%s", update.task_id, update.event_id
            )
            return False
        row = cur.execute(f"{_TASK_SELECT} WHERE task_id = ?", (update.task_id,)).fetchone()
        current = None if row is None else task_from_row(row, _dt)
        cur.execute(_TASK_UPSERT, task_params(merge_task(current, update), _ts))
        return True

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord | None:
        sql, params = f"{_TASK_SELECT} WHERE task_id = ?", [task_id]
        if tenant is not None:
            sql, params = sql + " AND tenant = ?", [task_id, tenant]
        with self._read() as cur:
            row = cur.execute(sql, params).fetchone()
        return None if row is None else task_from_row(row, _dt)

    def timeline(self, task_id: str, *, tenant: str | None = None) -> list[TaskEventRecord]:
        columns = ", ".join(f"e.{c}" for c in EVENT_COLUMNS)
        sql, params = f"SELECT {columns} FROM task_events e WHERE e.task_id = ?", [task_id]
        if tenant is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM tasks t WHERE t.task_id = e.task_id AND t.tenant = ?)"
            )
            params.append(tenant)
        with self._read() as cur:
            rows = cur.execute(sql + " ORDER BY e.time, e.rowid", params).fetchall()
        return [TaskEventRecord(r[0], r[1], r[2], r[3], _as_dt(r[4]), r[5], r[6]) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self._read() as cur:
            rows = cur.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({status: count for status, count in rows})
        return counts

    def claim_notification(
        self, task_id: str, event_id: str, url: str, *, lease_s: float | None = None
    ) -> bool:
        now = utcnow()
        cutoff = datetime.min.replace(tzinfo=UTC)
        if lease_s is not None:
            cutoff = now - timedelta(seconds=lease_s)
        with self._transaction() as cur:
            cur.execute(
                _CLAIM,
                (
                    task_id,
                    event_id,
                    NOTIFICATION_CLAIMED,
                    url,
                    _ts(now),
                    NOTIFICATION_CLAIMED,
                    _ts(cutoff),
                ),
            )
            return cur.rowcount == 1

    def complete_notification(self, task_id: str, http_status: int) -> bool:
        status = NOTIFICATION_DELIVERED if 200 <= http_status < 400 else NOTIFICATION_REJECTED
        with self._transaction() as cur:
            cur.execute(
                "UPDATE notifications SET status = ?, http_status = ?, delivered_at = ? "
                "WHERE task_id = ? AND status = ?",
                (status, http_status, _ts(utcnow()), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def release_notification(self, task_id: str) -> bool:
        with self._transaction() as cur:
            cur.execute(
                "DELETE FROM notifications WHERE task_id = ? AND status = ?",
                (task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def notification(self, task_id: str) -> NotificationRecord | None:
        sql = f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications WHERE task_id = ?"
        with self._read() as cur:
            r = cur.execute(sql, (task_id,)).fetchone()
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
    return NotificationRecord(r[0], r[1], r[2], r[3], _as_dt(r[4]), r[5], _dt(r[6]))
