"""PostgreSQL result store (psycopg 3): the production backend.

One connection per store object (autocommit off, guarded by a lock), one transaction per call.
`apply` inserts the event with `INSERT ... ON CONFLICT (event_id) DO NOTHING` (a duplicate ends
the call), locks the task row with `SELECT ... FOR UPDATE`, merges in Python with the same pure
`merge_task` the SQLite backend uses, and writes the row back; two writers racing to create the
same task are resolved by `ON CONFLICT (task_id) DO NOTHING` and a second locked read. Timestamps
are `timestamptz` (read back as UTC), JSON columns are text so both backends store the same bytes,
and `task_events.seq` (identity) orders timeline ties by arrival. The schema is created at open
under an advisory lock, so services starting together do not race on `CREATE TABLE IF NOT
EXISTS`. Connection loss, admin shutdown, lock timeouts, serialization failures and deadlocks
raise `RetryableError`; a broken connection is replaced on the next call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from conveyor.errors import RetryableError
from conveyor.store.base import (
    EVENT_COLUMNS,
    NOTIFICATION_CLAIMED,
    NOTIFICATION_COLUMNS,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_REJECTED,
    STATUSES,
    TASK_COLUMNS,
    Applied,
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

# Bounds how long open (and a reconnect) waits for an unreachable server before failing retryable.
CONNECT_TIMEOUT_S = 10
# Any key will do as long as every Conveyor process uses the same one for schema creation.
_SCHEMA_LOCK_KEY = 0x436F6E76  # "Conv"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id      text PRIMARY KEY,
    status       text NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    tenant       text,
    kind         text,
    stage        text,
    result       text,
    verdict      text CHECK (verdict IN ('allow', 'flag', 'block')),
    moderation   text,
    trace_id     text,
    error        text,
    callback_url text,
    completed_at timestamptz
);
CREATE INDEX IF NOT EXISTS tasks_status_idx ON tasks (status);
CREATE TABLE IF NOT EXISTS task_events (
    event_id text PRIMARY KEY,
    task_id  text NOT NULL,
    type     text NOT NULL,
    status   text NOT NULL,
    time     timestamptz NOT NULL,
    stage    text,
    detail   text,
    seq      bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS task_events_task_time_idx ON task_events (task_id, time, seq);
CREATE TABLE IF NOT EXISTS notifications (
    task_id      text PRIMARY KEY,
    event_id     text NOT NULL,
    status       text NOT NULL,
    url          text NOT NULL,
    claimed_at   timestamptz NOT NULL,
    http_status  integer,
    delivered_at timestamptz
)
"""

_TASK_SELECT = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks"
_TASK_INSERT = (
    f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(TASK_COLUMNS))}) ON CONFLICT (task_id) DO NOTHING"
)
_TASK_UPDATE = (
    "UPDATE tasks SET " + ", ".join(f"{c} = %s" for c in TASK_COLUMNS[1:]) + " WHERE task_id = %s"
)
_EVENT_INSERT = (
    f"INSERT INTO task_events ({', '.join(EVENT_COLUMNS)}) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING"
)
# An unfinished claim older than the cutoff is taken over; without a lease the cutoff is
# datetime.min, which no claim predates.
_CLAIM = (
    f"INSERT INTO notifications ({', '.join(NOTIFICATION_COLUMNS[:5])}) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (task_id) DO UPDATE SET "
    "event_id = excluded.event_id, url = excluded.url, claimed_at = excluded.claimed_at "
    "WHERE notifications.status = %s AND notifications.claimed_at < %s"
)

# Faults a later attempt can get past: connection/server trouble and lost concurrency races.
_TRANSIENT: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.TransactionRollback,
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
            for statement in _SCHEMA.split(";"):
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
        cur.execute(
            _EVENT_INSERT,
            (
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
            row = cur.execute(f"{_TASK_SELECT} WHERE task_id = %s", (update.task_id,)).fetchone()
            assert row is not None  # its event was recorded with the row, in one transaction
            return Applied(False, task_from_row(row, _utc))
        # Two rounds at most: the first may lose a race to insert the row, the second then finds
        # it (committed) and locks it.
        for _ in range(2):
            row = cur.execute(
                f"{_TASK_SELECT} WHERE task_id = %s FOR UPDATE", (update.task_id,)
            ).fetchone()
            current = None if row is None else task_from_row(row, _utc)
            merged = merge_task(current, update)
            if current is not None:
                if merged is not current:
                    params = task_params(merged, _utc)
                    cur.execute(_TASK_UPDATE, (*params[1:], update.task_id))
                return Applied(True, merged)
            cur.execute(_TASK_INSERT, task_params(merged, _utc))
            if cur.rowcount == 1:
                return Applied(True, merged)
        raise RetryableError(f"task row contention task_id={update.task_id}")

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord | None:
        sql, params = f"{_TASK_SELECT} WHERE task_id = %s", [task_id]
        if tenant is not None:
            sql, params = sql + " AND tenant = %s", [task_id, tenant]
        with self._transaction() as cur:
            row = cur.execute(sql, params).fetchone()
        return None if row is None else task_from_row(row, _utc)

    def timeline(self, task_id: str, *, tenant: str | None = None) -> list[TaskEventRecord]:
        columns = ", ".join(f"e.{c}" for c in EVENT_COLUMNS)
        sql, params = f"SELECT {columns} FROM task_events e WHERE e.task_id = %s", [task_id]
        if tenant is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM tasks t WHERE t.task_id = e.task_id AND t.tenant = %s)"
            )
            params.append(tenant)
        with self._transaction() as cur:
            rows = cur.execute(sql + " ORDER BY e.time, e.seq", params).fetchall()
        return [TaskEventRecord(r[0], r[1], r[2], r[3], _as_utc(r[4]), r[5], r[6]) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        with self._transaction() as cur:
            rows = cur.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
        counts = dict.fromkeys(sorted(STATUSES), 0)
        counts.update({status: int(count) for status, count in rows})
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
                (task_id, event_id, NOTIFICATION_CLAIMED, url, now, NOTIFICATION_CLAIMED, cutoff),
            )
            return cur.rowcount == 1

    def complete_notification(self, task_id: str, http_status: int) -> bool:
        status = NOTIFICATION_DELIVERED if 200 <= http_status < 400 else NOTIFICATION_REJECTED
        with self._transaction() as cur:
            cur.execute(
                "UPDATE notifications SET status = %s, http_status = %s, delivered_at = %s "
                "WHERE task_id = %s AND status = %s",
                (status, http_status, utcnow(), task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def release_notification(self, task_id: str) -> bool:
        with self._transaction() as cur:
            cur.execute(
                "DELETE FROM notifications WHERE task_id = %s AND status = %s",
                (task_id, NOTIFICATION_CLAIMED),
            )
            return cur.rowcount == 1

    def notification(self, task_id: str) -> NotificationRecord | None:
        sql = f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications WHERE task_id = %s"
        with self._transaction() as cur:
            r = cur.execute(sql, (task_id,)).fetchone()
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


def _notification(r: Sequence[Any]) -> NotificationRecord:
    return NotificationRecord(r[0], r[1], r[2], r[3], _as_utc(r[4]), r[5], _utc(r[6]))
