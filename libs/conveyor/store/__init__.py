"""Result store: where writeback records task state and timelines, and notify its notifications.

`open_store(url)` picks the backend from the URL: `sqlite:///relative/file.db`,
`sqlite:////absolute/file.db` (SQLAlchemy's convention: the path is what follows the third
slash), `sqlite:///:memory:` (private in-memory database, for unit tests), or
`postgresql://user@host:port/db` (also `postgres://`), passed as is to psycopg. Both are one
`SqlStore` (`sql.py`, every method written once) over a small dialect (`sqlite.py`,
`postgres.py`; the seam is `dialect.py`); the PostgreSQL driver is imported only when asked for.
The status model and merge rules are in `base.py`.
"""

from __future__ import annotations

from pydantic import SecretStr

from conveyor.store.base import (
    REJECTED_RECORD,
    STATUSES,
    TERMINAL_STATUSES,
    AmbiguousTaskError,
    Applied,
    NotificationRecord,
    Reservation,
    ResultStore,
    ReuseClaim,
    ReuseEntry,
    ReuseLookup,
    SweepReport,
    TaskEventRecord,
    TaskRecord,
    TaskStatus,
    TaskUpdate,
    is_terminal,
    merge_task,
    status_wins,
)
from conveyor.store.dialect import Dialect

__all__ = [
    "REJECTED_RECORD",
    "STATUSES",
    "TERMINAL_STATUSES",
    "AmbiguousTaskError",
    "Applied",
    "Dialect",
    "NotificationRecord",
    "Reservation",
    "ResultStore",
    "ReuseClaim",
    "ReuseEntry",
    "ReuseLookup",
    "SweepReport",
    "TaskEventRecord",
    "TaskRecord",
    "TaskStatus",
    "TaskUpdate",
    "is_terminal",
    "merge_task",
    "open_dialect",
    "open_store",
    "status_wins",
]

_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def open_store(url: str | SecretStr) -> ResultStore:
    """Open (and create the schema of) the store at `url`; raises ValueError for other schemes.

    The URL may be the `store_url` setting itself, a `SecretStr` (it may hold a password)."""
    from conveyor.store.sql import SqlStore

    return SqlStore(open_dialect(url))


def open_dialect(url: str | SecretStr) -> Dialect:
    """The connection and dialect of the database at `url` (`sqlite:///...`, `postgresql://...`);
    raises ValueError for other schemes. The store and the quota ledger share it."""
    if isinstance(url, SecretStr):
        url = url.get_secret_value()
    if url.startswith(_SQLITE_PREFIX):
        from conveyor.store.sqlite import SqliteDialect

        path = url.removeprefix(_SQLITE_PREFIX)
        if not path:
            raise ValueError(f"sqlite URL without a path: {url!r}")
        return SqliteDialect(path)
    if url.startswith(_POSTGRES_PREFIXES):
        from conveyor.store.postgres import PostgresDialect

        return PostgresDialect(url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ValueError(
        f"unsupported result store URL scheme {scheme!r}: use sqlite:///path or postgresql://..."
    )
