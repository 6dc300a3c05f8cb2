"""SQL of result reuse and retention, written once for both backends (`p` is the placeholder).

Reuse rows (`reuse_entries`, key = (tenant, reuse key)) are either a claim (`result` NULL, held
by `task_id` until `expires_at` = claim time + lease) or a stored result (until `expires_at` =
store time + TTL). A claim is taken by one upsert that succeeds only if the row is absent,
expired, or an unfinished claim of the same task (its own redelivery); both backends serialise
two claimants on the row (SQLite's write lock, PostgreSQL's row lock on conflict), so exactly
one of two racing identical tasks runs. Retention sweeps in chunks (`LIMIT`), ordered so the
notification and task deletes of one chunk name the same tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from conveyor.store.base import (
    REUSE_HIT,
    REUSE_RUN,
    REUSE_WAIT,
    ReuseClaim,
    ReuseEntry,
    ReuseLookup,
    SweepReport,
    dump_json,
    load_json,
)
from conveyor.store.dialect import Cursor

# A sweep stops after this many chunks per step even if rows remain (the next sweep goes on):
# one call never runs unbounded.
MAX_CHUNKS = 10_000


Stamp = Callable[[datetime], Any]  # a time as the backend binds it

REUSE_TABLE = """
CREATE TABLE IF NOT EXISTS reuse_entries (
    tenant     {text} NOT NULL,
    reuse_key  {text} NOT NULL,
    task_id    {text} NOT NULL,
    model      {text},
    result     {text},
    created_at {time} NOT NULL,
    expires_at {time} NOT NULL,
    PRIMARY KEY (tenant, reuse_key)
)"""
ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS tasks_expires_idx ON tasks (expires_at)",
    "CREATE INDEX IF NOT EXISTS reuse_entries_expires_idx ON reuse_entries (expires_at)",
)


@dataclass(frozen=True, slots=True)
class LifecycleSql:
    """The statements, with the backend's placeholder."""

    claim: str
    read: str
    finish: str
    release: str
    sweep_events: str
    purge: str
    delete_notifications: str
    delete_tasks: str
    sweep_reuse: str


def lifecycle_sql(p: str) -> LifecycleSql:
    expired = f"SELECT tenant, task_id FROM tasks WHERE expires_at <= {p}"
    oldest = f"{expired} ORDER BY expires_at, tenant, task_id LIMIT {p}"
    return LifecycleSql(
        claim=(
            "INSERT INTO reuse_entries (tenant, reuse_key, task_id, model, result, created_at, "
            f"expires_at) VALUES ({p}, {p}, {p}, NULL, NULL, {p}, {p}) "
            "ON CONFLICT (tenant, reuse_key) DO UPDATE SET task_id = excluded.task_id, "
            "model = NULL, result = NULL, created_at = excluded.created_at, "
            "expires_at = excluded.expires_at "
            f"WHERE reuse_entries.expires_at <= {p} OR (reuse_entries.result IS NULL "
            "AND reuse_entries.task_id = excluded.task_id)"
        ),
        read=(
            "SELECT task_id, model, result FROM reuse_entries "
            f"WHERE tenant = {p} AND reuse_key = {p}"
        ),
        # Whoever finishes writes the result, unless a live result is there already: identical
        # tasks have identical results, and a waiter that ran after its wait ran out is welcome.
        finish=(
            "INSERT INTO reuse_entries (tenant, reuse_key, task_id, model, result, created_at, "
            f"expires_at) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}) "
            "ON CONFLICT (tenant, reuse_key) DO UPDATE SET task_id = excluded.task_id, "
            "model = excluded.model, result = excluded.result, "
            "created_at = excluded.created_at, expires_at = excluded.expires_at "
            f"WHERE reuse_entries.result IS NULL OR reuse_entries.expires_at <= {p}"
        ),
        release=(
            f"DELETE FROM reuse_entries WHERE tenant = {p} AND reuse_key = {p} "
            f"AND task_id = {p} AND result IS NULL"
        ),
        sweep_events=(
            "DELETE FROM task_events WHERE event_id IN (SELECT e.event_id FROM task_events e "
            "JOIN tasks t ON t.tenant = e.tenant AND t.task_id = e.task_id "
            f"WHERE t.expires_at <= {p} LIMIT {p})"
        ),
        purge=(
            "UPDATE tasks SET result = NULL, moderation = NULL, error = NULL, "
            f"callback_url = NULL WHERE (tenant, task_id) IN ({expired} AND (result IS NOT NULL "
            "OR moderation IS NOT NULL OR error IS NOT NULL OR callback_url IS NOT NULL) "
            f"LIMIT {p})"
        ),
        delete_notifications=(f"DELETE FROM notifications WHERE (tenant, task_id) IN ({oldest})"),
        delete_tasks=f"DELETE FROM tasks WHERE (tenant, task_id) IN ({oldest})",
        sweep_reuse=(
            "DELETE FROM reuse_entries WHERE (tenant, reuse_key) IN (SELECT tenant, reuse_key "
            f"FROM reuse_entries WHERE expires_at <= {p} LIMIT {p})"
        ),
    )


def reuse_begin(
    cur: Cursor,
    sql: LifecycleSql,
    claims: Sequence[ReuseClaim],
    *,
    now: datetime,
    lease_s: float,
    stamp: Stamp,
) -> list[ReuseLookup]:
    """`ResultStore.reuse_begin` inside the caller's transaction."""
    out = []
    until = stamp(now + timedelta(seconds=lease_s))
    for c in claims:
        cur.execute(sql.claim, (c.tenant, c.key, c.task_id, stamp(now), until, stamp(now)))
        if cur.rowcount == 1:
            out.append(ReuseLookup(REUSE_RUN, c.task_id))
            continue
        holder, model, result = cur.execute(sql.read, (c.tenant, c.key)).fetchone()
        if result is None:
            out.append(ReuseLookup(REUSE_WAIT, holder))
        else:
            out.append(ReuseLookup(REUSE_HIT, holder, load_json(result), model))
    return out


def reuse_finish(
    cur: Cursor,
    sql: LifecycleSql,
    entries: Sequence[ReuseEntry],
    released: Sequence[ReuseClaim],
    *,
    now: datetime,
    stamp: Stamp,
) -> None:
    """`ResultStore.reuse_finish` inside the caller's transaction."""
    for e in entries:
        c = e.claim
        cur.execute(
            sql.finish,
            (
                c.tenant,
                c.key,
                c.task_id,
                e.model,
                dump_json(e.result),
                stamp(now),
                stamp(e.expires_at),
                stamp(now),
            ),
        )
    for c in released:
        cur.execute(sql.release, (c.tenant, c.key, c.task_id))


Run = Callable[[str, tuple[Any, ...]], int]  # one statement in its own transaction -> rowcount


def sweep(
    run: Run,
    sql: LifecycleSql,
    *,
    now: datetime,
    tombstone_s: float | None,
    limit: int,
    stamp: Stamp,
) -> SweepReport:
    """`ResultStore.sweep_expired`: each chunk its own short transaction (`run`)."""

    def chunks(statement: str, cutoff: datetime) -> int:
        total = 0
        for _ in range(MAX_CHUNKS):
            n = run(statement, (stamp(cutoff), limit))
            total += n
            if n < limit:
                break
        return total

    events = chunks(sql.sweep_events, now)
    purged = chunks(sql.purge, now)
    deleted = 0
    if tombstone_s is not None:
        cutoff = now - timedelta(seconds=tombstone_s)
        for _ in range(MAX_CHUNKS):
            run(sql.delete_notifications, (stamp(cutoff), limit))
            n = run(sql.delete_tasks, (stamp(cutoff), limit))
            deleted += n
            if n < limit:
                break
    reuse = chunks(sql.sweep_reuse, now)
    return SweepReport(events=events, purged=purged, deleted=deleted, reuse=reuse)
