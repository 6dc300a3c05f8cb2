"""What a SQL backend must say for the result store's shared code (`conveyor.store.sql`).

`SqlStore` writes every statement and every method once; a `Dialect` is the small rest that
really differs between SQLite and PostgreSQL:

- the parameter placeholder (`?`, `%s`) the shared statements are built with;
- how a time is bound and read back (ISO-8601 text, `timestamptz`), and the DDL time type;
- the connection and its transactions: how a write transaction takes its locks (`BEGIN
  IMMEDIATE`, or row locks with `FOR UPDATE`), how a read runs, reconnection, and which driver
  errors are transient (they become `RetryableError`);
- the column that orders timeline ties by arrival (`rowid`, an identity `seq`);
- the schema: its DDL, how to list a table's columns and how schema creation is serialised.

Both dialects speak the same INSERT ... ON CONFLICT forms (SQLite >= 3.24, PostgreSQL >= 9.5),
so upserts and insert-ignores are shared SQL, not dialect methods.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol


class Cursor(Protocol):
    """What the shared code needs of a DB-API cursor (sqlite3 and psycopg both have it)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, query: Any, params: Any, /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Any: ...


class Dialect(Protocol):
    """One backend's connection and its differences from the shared SQL."""

    name: str  # "sqlite" or "postgresql", in logs
    p: str  # the parameter placeholder
    time_type: str  # DDL type of a timestamp column
    arrival: str  # column of `task_events` that orders equal event times by arrival
    # Appended to the SELECT of a read-modify-write: a row lock where the transaction does not
    # already hold the write lock for the whole database.
    for_update: str
    # A statement taking a transaction-scoped lock on an integer key, where write transactions
    # do not already exclude each other (None: they do); paced batch dispatch counts the window
    # and claims under it (conveyor.store.dispatch).
    claim_lock: str | None
    schema: str  # the DDL of the tables, `;`-separated (created IF NOT EXISTS at open)

    def stamp(self, value: datetime | None) -> Any:
        """A timezone-aware time as the backend binds it (None stays NULL)."""
        ...

    def time(self, value: Any) -> datetime | None:
        """A stored time read back as an aware UTC datetime (NULL: None)."""
        ...

    def transaction(self) -> AbstractContextManager[Cursor]:
        """One write transaction: committed on exit, rolled back on error; transient driver
        errors raise `RetryableError`."""
        ...

    def read(self) -> AbstractContextManager[Cursor]:
        """A consistent read (no write lock taken); errors mapped as in `transaction`."""
        ...

    def columns(self, cur: Cursor, table: str) -> set[str]:
        """The columns `table` has now (empty: the table does not exist)."""
        ...

    def lock_schema(self, cur: Cursor) -> None:
        """Serialise schema creation between processes opening the store at once."""
        ...

    def close(self) -> None:
        """Close the connection; later calls fail."""
        ...
