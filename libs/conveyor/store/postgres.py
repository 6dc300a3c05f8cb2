"""PostgreSQL dialect of the result store (psycopg 3): the production backend.

One connection per store object (autocommit off, guarded by a lock), one transaction per call;
a broken connection is replaced on the next call. Several processes write at once, so the
read-merge-write of `apply` locks the task row with `SELECT ... FOR UPDATE` (`for_update`), and
two writers racing to create the same task are resolved by `ON CONFLICT DO NOTHING` and a second
locked read (`conveyor.store.sql`). Timestamps are `timestamptz` (read back as UTC), JSON
columns are text so both backends store the same bytes, and `task_events.seq` (identity) orders
timeline ties by arrival. The schema is created at open under an advisory lock, so services
starting together do not race on `CREATE TABLE IF NOT EXISTS`. Connection loss, admin shutdown,
lock timeouts, serialization failures and deadlocks raise `RetryableError`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg

from conveyor.errors import RetryableError
from conveyor.store.dialect import Cursor

log = logging.getLogger(__name__)

# Bounds how long open (and a reconnect) waits for an unreachable server before failing retryable.
CONNECT_TIMEOUT_S = 10
# Any key will do as long as every Conveyor process uses the same one for schema creation.
SCHEMA_LOCK_KEY = 0x436F6E76  # "Conv"

# Faults a later attempt can get past: connection/server trouble and lost concurrency races.
_TRANSIENT: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.TransactionRollback,
)

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

_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = %s"
)


class PostgresDialect:
    """`Dialect` on a PostgreSQL database (the URL is passed to psycopg as is, never logged)."""

    name = "postgresql"
    p = "%s"
    time_type = "timestamptz"
    arrival = "seq"
    for_update = " FOR UPDATE"
    # Serialises the dispatch claims (conveyor.store.dispatch): a transaction-scoped lock.
    claim_lock: str | None = "SELECT pg_advisory_xact_lock(%s)"
    schema = _SCHEMA

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return "PostgresDialect()"  # the URL may hold a password

    def stamp(self, value: datetime | None) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def time(self, value: Any) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

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
    def transaction(self) -> Iterator[Cursor]:
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

    def read(self) -> AbstractContextManager[Cursor]:
        # A read is a (short) transaction too: it sees one snapshot and ends before returning.
        return self.transaction()

    def columns(self, cur: Cursor, table: str) -> set[str]:
        return {str(r[0]) for r in cur.execute(_COLUMNS, (table,)).fetchall()}

    def lock_schema(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
