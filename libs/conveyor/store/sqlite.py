"""SQLite dialect of the result store: the embedded default, one file shared by several processes.

Writeback writes while the gateway and the CLI read the same file, so the database runs in WAL
mode (readers never block the writer) with a busy timeout, and every write transaction starts with
`BEGIN IMMEDIATE`, which takes the write lock up front: the read-merge-write of `apply` can then
never interleave with another process's (so no row locks: `for_update` is empty). One connection
per store object, guarded by a lock, so a store may be shared between threads. Timestamps are
ISO-8601 UTC text with microseconds (fixed width, so text order is time order). JSON columns hold
text. `sqlite:///:memory:` gives a private in-memory database for unit tests. "database is
locked" and I/O faults raise `RetryableError`. The statements are shared (`conveyor.store.sql`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conveyor.errors import RetryableError
from conveyor.paths import private_file
from conveyor.store.dialect import Cursor

# How long a statement waits for another process's write lock before failing as retryable.
# Writes hold the lock for milliseconds; 5 s absorbs bursts without stalling a stage for long.
BUSY_TIMEOUT_MS = 5000

# Messages of sqlite3.OperationalError that describe a transient condition, not a bug.
_TRANSIENT = ("locked", "busy", "disk i/o error", "unable to open database file")

# Keys include the tenant: a task is (tenant, task_id). `digest` identifies the gateway
# submission that reserved the row (not part of `TaskRecord`). Timeline ties are ordered by the
# implicit `rowid` (arrival).
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
CREATE INDEX IF NOT EXISTS batch_items_task_idx ON batch_items (tenant, task_id)
"""


class SqliteDialect:
    """`Dialect` on one SQLite file (or `:memory:`)."""

    name = "sqlite"
    p = "?"
    time_type = "TEXT"
    arrival = "rowid"
    for_update = ""  # BEGIN IMMEDIATE already holds the database's write lock
    claim_lock: str | None = None  # and it serialises the dispatch claims too
    schema = _SCHEMA

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            private_file(Path(path))  # results may be private; SQLite's -wal/-shm copy the mode
        self.path = path
        self._lock = threading.Lock()
        with _mapped_errors():
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE ourselves.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path != ":memory:":
                self._conn.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit survives power loss, since Kafka offsets are committed after it.
                self._conn.execute("PRAGMA synchronous = FULL")

    def __repr__(self) -> str:
        return f"SqliteDialect(path={self.path!r})"

    def stamp(self, value: datetime | None) -> str | None:
        return None if value is None else value.astimezone(UTC).isoformat(timespec="microseconds")

    def time(self, value: Any) -> datetime | None:
        return None if value is None else datetime.fromisoformat(str(value))

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
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
    def read(self) -> Iterator[Cursor]:
        # Autocommit reads: each SELECT sees a consistent WAL snapshot without taking a lock.
        with self._lock, _mapped_errors():
            cur = self._conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def columns(self, cur: Cursor, table: str) -> set[str]:
        return {str(r[1]) for r in cur.execute(f"PRAGMA table_info({table})").fetchall()}

    def lock_schema(self, cur: Cursor) -> None:
        return None  # the schema transaction's BEGIN IMMEDIATE serialises it

    def close(self) -> None:
        with self._lock:
            self._conn.close()


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
