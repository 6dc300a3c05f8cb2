"""The SQL of tasks, timelines, reservations and notifications, written once for both backends.

`store_sql(dialect)` builds the statements with the dialect's placeholder, row-lock suffix and
arrival column; `SqlStore` builds them once at open. Reuse and retention statements are in
`lifecycle.py`, batch statements in `batches.py`, variant runs in `variantruns.py`, each built
the same way from the placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.store.base import (
    EVENT_COLUMNS,
    NOTIFICATION_COLUMNS,
    STATUSES,
    TASK_COLUMNS,
    TERMINAL_STATUSES,
)
from conveyor.store.dialect import Dialect

# Statuses a task is still in flight in (pending, processing, retrying), as bound.
UNFINISHED = tuple(sorted(STATUSES - TERMINAL_STATUSES))
# Columns a merge rewrites: all but the key.
UPDATED_COLUMNS = tuple(c for c in TASK_COLUMNS if c not in ("task_id", "tenant"))


def marks(p: str, count: int) -> str:
    """`count` placeholders, comma-separated: the inside of an `IN (...)`."""
    return ", ".join([p] * count)


@dataclass(frozen=True, slots=True)
class StoreSql:
    """The statements, with one backend's placeholder."""

    task_by_key: str
    task_for_update: str
    tasks_by_id: str
    tenants_by_id: str
    task_insert: str
    task_update: str
    reserve: str
    reservation: str
    release: str
    event_insert: str
    timeline: str
    count_by_status: str
    count_unfinished: str
    claim: str
    complete_notification: str
    release_notification: str
    notification: str
    list_notifications: str


def store_sql(dialect: Dialect) -> StoreSql:
    p = dialect.p
    key = f"tenant = {p} AND task_id = {p}"
    task_select = f"SELECT {', '.join(TASK_COLUMNS)} FROM tasks"
    notification_select = f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM notifications"
    return StoreSql(
        task_by_key=f"{task_select} WHERE {key}",
        task_for_update=f"{task_select} WHERE {key}{dialect.for_update}",
        tasks_by_id=f"{task_select} WHERE task_id = {p} LIMIT 2",
        tenants_by_id=f"SELECT tenant FROM tasks WHERE task_id = {p}",
        # A writer that lost the race to create the row finds it on its next (locked) read.
        task_insert=(
            f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) "
            f"VALUES ({marks(p, len(TASK_COLUMNS))}) ON CONFLICT (tenant, task_id) DO NOTHING"
        ),
        task_update=(
            "UPDATE tasks SET " + ", ".join(f"{c} = {p}" for c in UPDATED_COLUMNS) + f" WHERE {key}"
        ),
        reserve=(
            "INSERT INTO tasks (tenant, task_id, status, created_at, updated_at, kind, "
            f"callback_url, digest) VALUES ({marks(p, 8)}) "
            "ON CONFLICT (tenant, task_id) DO NOTHING"
        ),
        reservation=f"SELECT {', '.join(TASK_COLUMNS)}, digest FROM tasks WHERE {key}",
        release=(
            f"DELETE FROM tasks WHERE {key} AND status = {p} AND digest = {p} "
            f"AND NOT EXISTS (SELECT 1 FROM task_events WHERE {key})"
        ),
        event_insert=(
            f"INSERT INTO task_events (tenant, {', '.join(EVENT_COLUMNS)}) "
            f"VALUES ({marks(p, 1 + len(EVENT_COLUMNS))}) ON CONFLICT (event_id) DO NOTHING"
        ),
        timeline=(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM task_events WHERE {key} "
            f"ORDER BY time, {dialect.arrival}"
        ),
        count_by_status="SELECT status, COUNT(*) FROM tasks GROUP BY status",
        count_unfinished=(
            f"SELECT COUNT(*) FROM tasks WHERE tenant = {p} "
            f"AND status IN ({marks(p, len(UNFINISHED))})"
        ),
        # An unfinished claim older than the cutoff is taken over; without a lease the cutoff
        # is datetime.min, which no claim predates.
        claim=(
            "INSERT INTO notifications (tenant, task_id, event_id, status, url, claimed_at) "
            f"VALUES ({marks(p, 6)}) "
            "ON CONFLICT (tenant, task_id) DO UPDATE SET event_id = excluded.event_id, "
            "url = excluded.url, claimed_at = excluded.claimed_at "
            f"WHERE notifications.status = {p} AND notifications.claimed_at < {p}"
        ),
        complete_notification=(
            f"UPDATE notifications SET status = {p}, http_status = {p}, delivered_at = {p} "
            f"WHERE {key} AND status = {p}"
        ),
        release_notification=f"DELETE FROM notifications WHERE {key} AND status = {p}",
        notification=f"{notification_select} WHERE {key}",
        list_notifications=f"{notification_select} ORDER BY claimed_at, task_id LIMIT {p}",
    )
