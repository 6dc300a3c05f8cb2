"""Fair share in the stage loop: the read-ahead window in front of the pipeline, batches cut on
the model's worker when it is free for them, and commits in order up to the lowest unfinished
record (`CommitTracker`). Held records past their deadline are failed here (reason: quota).

The window itself (lanes, then deficit round robin over tenants) is `conveyor.runtime.fairshare`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor.errors import PermanentError
from conveyor.quota import QUOTA_REJECTIONS, QuotaError
from conveyor.runtime.fairshare import (
    DEADLINE_HEADER,
    NO_TENANT,
    TENANT_HEADER,
    TP,
    FairWindow,
    header_tenant,
)

if TYPE_CHECKING:
    from conveyor.runtime.step import BatchResult

# How often held records are checked against their deadlines (a scan of the held tenants'
# queues): a record refused this much late has still lost nothing it could have had.
LATE_SCAN_S = 0.25
# After a cut found every waiting tenant held: how long before another batch is queued, unless
# records arrive or finish first (a rate quota frees up with time alone).
_IDLE_CUT_S = 0.02


class CommitTracker:
    """Offsets read but not finished, per partition; commits go up to the lowest unfinished."""

    def __init__(self) -> None:
        self._open: dict[TP, set[int]] = {}
        self._next: dict[TP, int] = {}  # one past the highest offset read
        # Kept as a number (not summed over `_open`): the lag reporter's thread reads it.
        self.outstanding = 0

    def read(self, records: Iterable[Any]) -> None:
        for msg in records:
            tp, offset = (msg.topic(), msg.partition()), msg.offset()
            pending = self._open.setdefault(tp, set())
            if offset not in pending:
                pending.add(offset)
                self.outstanding += 1
            self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finish(self, done: Iterable[tuple[TP, int]]) -> dict[TP, int]:
        """Mark records finished; the offset to commit for each partition they touched."""
        touched = set()
        for tp, offset in done:
            pending = self._open.get(tp)
            if pending is not None and offset in pending:
                pending.remove(offset)
                self.outstanding -= 1
            touched.add(tp)
        return {tp: self.commit_point(tp) for tp in touched if tp in self._next}

    def commit_point(self, tp: TP) -> int:
        pending = self._open.get(tp)
        return min(pending) if pending else self._next[tp]

    def forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self.outstanding -= len(self._open.pop(tp, ()))
            self._next.pop(tp, None)


class FairShare:
    """The window and the commit tracker in front of the stage's pipeline: records read go to
    the window; the pipeline is kept `depth` batches deep, each batch *cut on the worker when
    the batch before it ends* (`Pipeline.defer`), so a record that arrives while the model is
    busy competes for the very next batch; finished batches commit up to the lowest unfinished
    record.

    The window is shared by the loop's thread (add, drop, late) and the worker (cut): `_lock`
    guards it and the quota counts."""

    def __init__(
        self,
        window: FairWindow,
        pipeline: Any,
        batch_max: int,
        depth: int = 2,
        finished: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        # GPU-aware capacity (conveyor.ml.capacity): batch size, in-flight bound and "at
        # capacity" come from the device when the handler's resources hold a controller.
        self.capacity: Any = None
        self.finished = finished  # quotas: a tenant's task is no longer in flight
        self.pipeline = pipeline  # conveyor.runtime.pipeline.Pipeline
        self.batch_max = batch_max
        self.depth = depth
        self.clock = clock
        self.tracker = CommitTracker()
        # Quotas: a held tenant's least wait for its i-th record (None: not held), and the step
        # that fails records unrun; records that cannot start before their deadline go to it.
        self.held_wait: Callable[[str, int], float | None] | None = None
        self.refuse: Callable[[Sequence[Any], str], BatchResult] | None = None
        self.wall: Callable[[], datetime] = lambda: datetime.now(UTC)
        self._next_scan = 0.0
        self._refused: set[tuple[TP, int]] = set()  # never admitted: not "finished" either
        self._lock = threading.Lock()
        # A cut that found nothing to run (every waiting tenant held): no new batch is queued
        # before this time unless records arrive or finish, so a held window does not spin.
        self._idle_until = 0.0

    @property
    def full(self) -> bool:
        return self.window.full or (self.capacity is not None and self.capacity.plan().at_capacity)

    @property
    def outstanding(self) -> int:
        return self.tracker.outstanding

    def add(self, records: Sequence[Any], now: float) -> None:
        self.tracker.read(records)
        with self._lock:
            self.window.add(records, now)
        self._idle_until = 0.0

    def feed(self, now: float, stamp: str) -> None:
        """Keep `depth` batches queued on the worker while records wait; each is cut from the
        window only when the worker reaches it."""
        self._refuse_late(now, stamp)
        depth = self.depth
        if self.capacity is not None:
            plan = self.capacity.plan()
            depth = max(1, plan.max_in_flight // max(1, plan.batch_size))
        while len(self.window) and self.pipeline.batches < depth and now >= self._idle_until:
            self.pipeline.defer(self._cut)

    def _cut(self) -> list[Any]:
        """The next batch, on the worker thread, the moment the model is free for it."""
        size = self.capacity.plan().batch_size if self.capacity is not None else self.batch_max
        now = self.clock()
        with self._lock:
            batch = self.window.take(size, now)
        if not batch:
            self._idle_until = now + _IDLE_CUT_S
        return batch

    def _refuse_late(self, now: float, stamp: str) -> None:
        """Every `LATE_SCAN_S`: held records that cannot start before their deadline are failed
        (reason: quota) instead of waiting to expire."""
        if self.held_wait is None or self.refuse is None or now < self._next_scan:
            return
        self._next_scan = now + LATE_SCAN_S
        with self._lock:
            late = self.window.late(self.wall(), self.held_wait)
        if not late:
            return
        for tenant, msg in late:
            QUOTA_REJECTIONS.labels(tenant=tenant, limit="deadline").inc()
            self._refused.add(((msg.topic(), msg.partition()), msg.offset()))
        self.pipeline.submit([msg for _, msg in late], stamp, step=self.refuse)

    def settle(self, result: BatchResult) -> BatchResult:
        """The batch's result with the offsets that may be committed now."""
        done = [((o.item.topic, o.item.partition), o.item.offset) for o in result.outcomes]
        if self.finished is not None:
            with self._lock:
                for outcome, key in zip(result.outcomes, done, strict=True):
                    if key in self._refused:
                        self._refused.discard(key)
                    else:
                        self.finished(header_tenant(outcome.item.headers))
        self._idle_until = 0.0  # a tenant's task finished: it may be under its quota again
        return replace(result, offsets=self.tracker.finish(done))

    def drop(self, tps: Iterable[TP] | None = None) -> int:
        """Records of these partitions (all: None) leave the window unrun; they stay
        unfinished, so the commit stops before them and they are read again."""
        with self._lock:
            return len(self.window.drop(tps))

    def forget(self, tps: Iterable[TP]) -> None:
        self.tracker.forget(tps)


def quota_refusal(item: Any) -> PermanentError:
    """Why a held record is failed unrun: its tenant's quota keeps it past its deadline."""
    tenant = item.hmap.get(TENANT_HEADER, NO_TENANT)
    deadline = item.hmap.get(DEADLINE_HEADER)
    return QuotaError(
        f"quota: tenant {tenant!r} is over its quota and the task cannot start before its "
        f"deadline {deadline}"
    )
