"""Schema creation and migration at open, written once for both backends.

Each dialect holds its own DDL (`Dialect.schema`: the types differ); what happens at open is the
same for both, in one transaction, serialised between processes (`Dialect.lock_schema`):

1. A database written before task ids were per tenant (`tasks` without `digest`) has its tables
   renamed *_v1.
2. The tables are created IF NOT EXISTS (the dialect's DDL, variant runs, reuse entries).
3. The *_v1 rows are copied (a NULL tenant becomes "", an event or notification takes its task's
   tenant; events in arrival order; old event ids stay as they were) and the old tables dropped.
4. Columns added since (`ADDED_COLUMNS`) are added where missing: old rows keep NULLs.
"""

from __future__ import annotations

import logging

from conveyor.store import dispatch, lifecycle
from conveyor.store.base import (
    ADDED_TASK_COLUMNS,
    EVENT_COLUMNS,
    NOTIFICATION_COLUMNS,
    TASK_COLUMNS,
)
from conveyor.store.dialect import Cursor, Dialect
from conveyor.store.variantruns import run_schema

log = logging.getLogger(__name__)

# Columns added to existing tables after their CREATE: (table, column, type), where the type
# `{time}` is the dialect's timestamp type. Additive only; the DDL of each dialect has them too.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = tuple(
    ("tasks", name, "{time}") for name in ADDED_TASK_COLUMNS
)

_OLD_TABLES = ("tasks", "task_events", "notifications")
_OLD_INDEXES = ("tasks_status_idx", "task_events_task_time_idx")
_OWNER = "COALESCE((SELECT t.tenant FROM tasks_v1 t WHERE t.task_id = o.task_id), '')"
_V1_TASK_COLUMNS = tuple(c for c in TASK_COLUMNS if c not in ADDED_TASK_COLUMNS)


def create_schema(cur: Cursor, dialect: Dialect) -> None:
    """Create, migrate and extend the schema inside the caller's transaction."""
    dialect.lock_schema(cur)
    tasks = dialect.columns(cur, "tasks")
    old = bool(tasks) and "digest" not in tasks
    if old:
        _rename_old(cur)
    for statement in _statements(dialect.schema + ";" + run_schema(dialect.time_type)):
        cur.execute(statement)
    if old:
        _copy_old(cur, dialect)
    _add_columns(cur, dialect)
    cur.execute(lifecycle.REUSE_TABLE.format(text="TEXT", time=dialect.time_type))
    for statement in lifecycle.ADDED_INDEXES:
        cur.execute(statement)
    for statement in dispatch.schema("TEXT", dialect.time_type):  # paced batch dispatch
        cur.execute(statement)


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


def _rename_old(cur: Cursor) -> None:
    for index in _OLD_INDEXES:
        cur.execute(f"DROP INDEX IF EXISTS {index}")
    for table in _OLD_TABLES:
        cur.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")


def _copy_old(cur: Cursor, dialect: Dialect) -> None:
    migrate = (
        f"INSERT INTO tasks ({', '.join(_V1_TASK_COLUMNS)}) SELECT "
        + ", ".join("COALESCE(tenant, '')" if c == "tenant" else c for c in _V1_TASK_COLUMNS)
        + " FROM tasks_v1",
        f"INSERT INTO task_events (tenant, {', '.join(EVENT_COLUMNS)}) SELECT {_OWNER}, "
        + ", ".join(f"o.{c}" for c in EVENT_COLUMNS)
        + f" FROM task_events_v1 o ORDER BY o.{dialect.arrival}",
        f"INSERT INTO notifications ({', '.join(NOTIFICATION_COLUMNS)}) SELECT "
        + ", ".join(_OWNER if c == "tenant" else f"o.{c}" for c in NOTIFICATION_COLUMNS)
        + " FROM notifications_v1 o",
    )
    for statement in migrate:
        cur.execute(statement)
    for table in _OLD_TABLES:
        cur.execute(f"DROP TABLE {table}_v1")
    log.warning("result store migrated to per-tenant task keys backend=%s", dialect.name)


def _add_columns(cur: Cursor, dialect: Dialect) -> None:
    existing: dict[str, set[str]] = {}
    for table, column, kind in ADDED_COLUMNS:
        if table not in existing:
            existing[table] = dialect.columns(cur, table)
        if column not in existing[table]:
            ddl_type = kind.format(time=dialect.time_type)
            cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl_type}")
