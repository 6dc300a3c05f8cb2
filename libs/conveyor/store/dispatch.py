"""SQL of paced batch dispatch and batch listing, written once for both backends (`p` is the
placeholder). docs/batches.md, "Paced dispatch".

Each batch item has a dispatch row (`batch_dispatch`, written with the batch in one transaction)
holding the task's body until it is published, and a state:

- `queued`: not published yet;
- `claimed`: a gateway replica is publishing it, until `claim_until` (a replica that dies
  mid-publish leaves a claim that lapses, and the item is claimed again: it may then be
  published twice, which the pipeline's at-least-once handling absorbs);
- `dispatched`: published and its task not yet ended: it counts against the window;
- `done`: published and ended, or ended without being published (refused, cancelled, expired).

A claim is one transaction that two replicas cannot both win: SQLite's `BEGIN IMMEDIATE` write
lock, PostgreSQL's transaction-scoped advisory lock (`DISPATCH_LOCK`), so the in-flight count it
reads cannot change under it. It first moves the dispatched items whose task has ended to `done`
(so the count scans only what is in flight), counts what is in flight, and claims up to the free
part of the window from the batches `in_progress`, oldest first, shared round robin across
tenants and then across each tenant's batches, each batch's items in input order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from conveyor.store.base import TERMINAL_STATUSES
from conveyor.store.batches import BATCH_COLUMNS, BatchRecord, BatchStatus, NewBatchItem

QUEUED = "queued"
CLAIMED = "claimed"
DISPATCHED = "dispatched"
DONE = "done"
DISPATCH_LOCK = 0x436F6E62  # "Conb": PostgreSQL advisory lock key serialising claims
# One claim takes at most this many items (with no window, i.e. unpaced, the whole batch is
# still published in rounds of this size, as before pacing).
CLAIM_MAX = 1000

DISPATCH_TABLE = """
CREATE TABLE IF NOT EXISTS batch_dispatch (
    tenant      {text} NOT NULL,
    batch_id    {text} NOT NULL,
    line        INTEGER NOT NULL,
    task_id     {text} NOT NULL,
    body        {text},
    state       {text} NOT NULL,
    claim_until {time},
    PRIMARY KEY (tenant, batch_id, line)
)"""
DISPATCH_INDEXES = (
    "CREATE INDEX IF NOT EXISTS batch_dispatch_next_idx "
    "ON batch_dispatch (tenant, batch_id, state, line)",
    "CREATE INDEX IF NOT EXISTS batch_dispatch_state_idx ON batch_dispatch (state)",
    "CREATE INDEX IF NOT EXISTS batches_status_idx ON batches (status, created_at)",
)


class Cursor(Protocol):
    """What the shared code needs of a DB-API cursor (sqlite3 and psycopg both have it)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, query: Any, params_seq: Any, /) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Stamp = Callable[[datetime], Any]  # a time as the backend binds it


@dataclass(frozen=True, slots=True)
class DispatchItem:
    """A claimed batch item: the task to publish, and where its dispatch row is."""

    tenant: str
    batch_id: str
    line: int
    task_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DispatchSql:
    """The statements, with the backend's placeholder; `lock` is None where the transaction
    itself serialises writers (SQLite)."""

    lock: str | None
    insert: str
    settle: str
    in_flight: str
    active: str
    claimable: str
    claim: str
    mark: str
    release: str
    stop_select: str
    stop: str
    list_first: str
    list_after: str


def dispatch_sql(p: str, *, lock: str | None) -> DispatchSql:
    terminal = ", ".join(f"'{s}'" for s in sorted(TERMINAL_STATUSES))  # fixed enum values
    row = f"tenant = {p} AND batch_id = {p}"
    open_item = f"(state = '{QUEUED}' OR (state = '{CLAIMED}' AND claim_until <= {p}))"
    columns = ", ".join(BATCH_COLUMNS)
    return DispatchSql(
        lock=lock,
        insert=(
            "INSERT INTO batch_dispatch (tenant, batch_id, line, task_id, body, state) "
            f"VALUES ({p}, {p}, {p}, {p}, {p}, '{QUEUED}')"
        ),
        settle=(
            f"UPDATE batch_dispatch SET state = '{DONE}', body = NULL "
            f"WHERE state = '{DISPATCHED}' AND EXISTS (SELECT 1 FROM tasks t "
            "WHERE t.tenant = batch_dispatch.tenant AND t.task_id = batch_dispatch.task_id "
            f"AND t.status IN ({terminal}))"
        ),
        in_flight=(
            f"SELECT COUNT(*) FROM batch_dispatch WHERE state = '{DISPATCHED}' "
            f"OR (state = '{CLAIMED}' AND claim_until > {p})"
        ),
        active=(
            f"SELECT tenant, batch_id FROM batches WHERE status = '{BatchStatus.IN_PROGRESS}' "
            "ORDER BY created_at, batch_id"
        ),
        claimable=(
            f"SELECT line, task_id, body FROM batch_dispatch WHERE {row} AND {open_item} "
            f"ORDER BY line LIMIT {p}"
        ),
        claim=(
            f"UPDATE batch_dispatch SET state = '{CLAIMED}', claim_until = {p} "
            f"WHERE {row} AND line = {p}"
        ),
        mark=(
            f"UPDATE batch_dispatch SET state = {p}, body = NULL, claim_until = NULL "
            f"WHERE {row} AND line = {p} AND state = '{CLAIMED}'"
        ),
        release=(
            f"UPDATE batch_dispatch SET state = '{QUEUED}', claim_until = NULL "
            f"WHERE {row} AND line = {p} AND state = '{CLAIMED}'"
        ),
        stop_select=f"SELECT task_id FROM batch_dispatch WHERE {row} AND {open_item} ORDER BY line",
        stop=(
            f"UPDATE batch_dispatch SET state = '{DONE}', body = NULL, claim_until = NULL "
            f"WHERE {row} AND {open_item}"
        ),
        list_first=(
            f"SELECT {columns} FROM batches WHERE tenant = {p} "
            f"ORDER BY created_at DESC, batch_id DESC LIMIT {p}"
        ),
        list_after=(
            f"SELECT {columns} FROM batches WHERE tenant = {p} AND (created_at < {p} "
            f"OR (created_at = {p} AND batch_id < {p})) "
            f"ORDER BY created_at DESC, batch_id DESC LIMIT {p}"
        ),
    )


def schema(text: str, time: str) -> list[str]:
    """The table and indexes (additive), in the backend's types."""
    return [DISPATCH_TABLE.format(text=text, time=time), *DISPATCH_INDEXES]


def insert(
    cur: Cursor, sql: DispatchSql, tenant: str, batch_id: str, items: Sequence[NewBatchItem]
) -> None:
    """The dispatch rows of a new batch, inside `create_batch`'s transaction."""
    cur.executemany(
        sql.insert,
        [
            (
                tenant,
                batch_id,
                n.item.line,
                n.item.task_id,
                json.dumps(n.body, separators=(",", ":")),
            )
            for n in items
        ],
    )


def claim(
    cur: Cursor,
    sql: DispatchSql,
    *,
    window: int | None,
    lease_s: float,
    now: datetime,
    stamp: Stamp,
    min_free: int = 1,
) -> list[DispatchItem]:
    """`DispatchStore.claim_dispatch` inside the caller's transaction (module docstring)."""
    if sql.lock is not None:
        cur.execute(sql.lock, (DISPATCH_LOCK,))
    cur.execute(sql.settle)
    if window is None:
        free = CLAIM_MAX
    else:
        cur.execute(sql.in_flight, (stamp(now),))
        in_flight = int(cur.fetchall()[0][0])
        free = min(CLAIM_MAX, window - in_flight)
        if in_flight and free < min_free:
            return []  # wait for a chunk's worth of room: stages then get batches, not a trickle
    if free <= 0:
        return []
    cur.execute(sql.active)
    batches = [(str(tenant), str(batch_id)) for tenant, batch_id in cur.fetchall()]
    queues: dict[tuple[str, str], list[DispatchItem]] = {}
    for tenant, batch_id in batches:
        cur.execute(sql.claimable, (tenant, batch_id, stamp(now), free))
        queues[(tenant, batch_id)] = [
            DispatchItem(tenant, batch_id, int(line), str(task_id), json.loads(body))
            for line, task_id, body in cur.fetchall()
        ]
    chosen = fair_share(batches, queues, free)
    until = stamp(now + timedelta(seconds=lease_s))
    cur.executemany(sql.claim, [(until, i.tenant, i.batch_id, i.line) for i in chosen])
    return chosen


def fair_share(
    batches: Sequence[tuple[str, str]],
    queues: dict[tuple[str, str], list[DispatchItem]],
    free: int,
) -> list[DispatchItem]:
    """Up to `free` items, round robin across tenants (in the order their oldest batch came),
    and within a tenant round robin across its batches; each batch's items in input order."""
    tenants: dict[str, list[list[DispatchItem]]] = {}
    for key in batches:
        if queues.get(key):
            tenants.setdefault(key[0], []).append(list(reversed(queues[key])))
    turn = {tenant: 0 for tenant in tenants}
    chosen: list[DispatchItem] = []
    while len(chosen) < free and tenants:  # each pass takes one item per tenant: bounded
        for tenant in list(tenants):
            stacks = tenants[tenant]
            stack = stacks[turn[tenant] % len(stacks)]
            chosen.append(stack.pop())
            if not stack:
                stacks.remove(stack)
            else:
                turn[tenant] += 1
            if not stacks:
                del tenants[tenant]
            if len(chosen) == free:
                break
    return chosen


def finish(
    cur: Cursor,
    sql: DispatchSql,
    *,
    dispatched: Sequence[DispatchItem],
    done: Sequence[DispatchItem],
    released: Sequence[DispatchItem],
) -> None:
    """`DispatchStore.finish_dispatch` inside the caller's transaction."""
    marks = [(DISPATCHED, i.tenant, i.batch_id, i.line) for i in dispatched]
    marks += [(DONE, i.tenant, i.batch_id, i.line) for i in done]
    if marks:
        cur.executemany(sql.mark, marks)
    if released:
        cur.executemany(sql.release, [(i.tenant, i.batch_id, i.line) for i in released])


def stop(
    cur: Cursor, sql: DispatchSql, tenant: str, batch_id: str, *, now: datetime, stamp: Stamp
) -> list[str]:
    """`DispatchStore.stop_dispatch` inside the caller's transaction: the batch's items never
    dispatched (queued, or claimed by a replica that let its claim lapse) become `done`; their
    task ids, in input order."""
    if sql.lock is not None:
        cur.execute(sql.lock, (DISPATCH_LOCK,))
    cur.execute(sql.stop_select, (tenant, batch_id, stamp(now)))
    task_ids = [str(task_id) for (task_id,) in cur.fetchall()]
    cur.execute(sql.stop, (tenant, batch_id, stamp(now)))
    return task_ids


def list_batches(
    cur: Cursor,
    sql: DispatchSql,
    tenant: str,
    *,
    limit: int,
    after: BatchRecord | None,
    stamp: Stamp,
) -> list[Sequence[Any]]:
    """Rows of the tenant's batches, newest first, after the batch `after` (a cursor)."""
    if after is None:
        cur.execute(sql.list_first, (tenant, limit))
    else:
        at = stamp(after.created_at)
        cur.execute(sql.list_after, (tenant, at, at, after.batch_id, limit))
    return list(cur.fetchall())


@runtime_checkable
class DispatchStore(Protocol):
    """What paced dispatch and the batch list need from the store (both backends have it)."""

    def claim_dispatch(
        self, *, window: int | None, lease_s: float, now: datetime, min_free: int = 1
    ) -> list[DispatchItem]:
        """Claim the next items to publish, keeping dispatched-and-unfinished items of every
        batch within `window` (None: no bound), and only once `min_free` of it is free (or
        nothing is in flight); the claims lapse after `lease_s`."""
        ...

    def finish_dispatch(
        self,
        *,
        dispatched: Sequence[DispatchItem],
        done: Sequence[DispatchItem] = (),
        released: Sequence[DispatchItem] = (),
    ) -> None:
        """Record claimed items as published, ended unpublished, or back in the queue."""
        ...

    def stop_dispatch(self, tenant: str, batch_id: str, *, now: datetime) -> list[str]:
        """Stop the batch's dispatch: the task ids of its items never dispatched."""
        ...

    def list_batches(
        self, tenant: str, *, limit: int, after: str | None = None
    ) -> list[BatchRecord]:
        """The tenant's batches, newest first, after the batch id `after` (None: from the
        newest); an `after` that names no batch of the tenant gives []."""
        ...
