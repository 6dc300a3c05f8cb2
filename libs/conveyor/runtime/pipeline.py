"""Pipelined execution: the batch step runs on a worker thread while the loop keeps polling,
producing, acknowledging and committing.

Records are gathered while the worker is busy and handed over as one batch (up to
`batch_max`) when it is free, so batches stay full however often the loop polls. One worker,
batches in the order they were read, so results come back in order and offsets are
committed in order up to the lowest unfinished record. In-flight records are bounded: at
`max_in_flight` the loop takes one record per turn (it keeps polling, so the consumer stays in
its group however long a generation takes); at twice that it pauses its partitions, resuming
them once half of `max_in_flight` is left. A revoke
waits for the in-flight work (bounded by `max_in_flight`) before the partitions move.

A scheduler (fair share, `conveyor.runtime.fairfeed`) instead queues batches it cuts itself on
the worker, the moment the worker reaches them (`defer`), so the model goes from one batch
straight to the next and the choice of records is made as late as it can be.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from conveyor.runtime.step import BatchResult, now_iso

Step = Callable[[Sequence[Any], str], BatchResult]
_EMPTY = BatchResult([], {}, {})  # what a deferred batch with no records comes back as


class Pipeline:
    def __init__(self, step: Step, max_in_flight: int, batch_max: int) -> None:
        self.step = step
        self.max_in_flight = max_in_flight
        self.batch_max = batch_max
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")
        self._queue: deque[tuple[int, Future[BatchResult]]] = deque()
        self._forming: list[Any] = []  # read while the worker is busy: its next batch
        self.in_flight = 0  # records taken, their result not yet taken
        self.started_at: float | None = None  # when the oldest unfinished batch was submitted

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._forming)

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight

    @property
    def overfull(self) -> bool:
        return self.in_flight >= 2 * self.max_in_flight

    @property
    def drained(self) -> bool:
        """Half the bound or less: resume reading. The half still queued keeps the worker busy
        while the resumed partitions' first fetch comes back (up to fetch.wait.max.ms)."""
        return self.in_flight <= self.max_in_flight // 2

    def offer(self, records: Sequence[Any], now: str) -> None:
        """Take records; they go to the worker in full batches, or at once when it is idle."""
        self._forming.extend(records)
        self.in_flight += len(records)
        self.pump(now)

    def pump(self, now: str, *, all_of_it: bool = False) -> None:
        """Hand the gathered records to the worker: full batches always, the rest when the
        worker has nothing left to do (or `all_of_it`)."""
        while len(self._forming) >= self.batch_max:
            self._submit(self._forming[: self.batch_max], now)
            del self._forming[: self.batch_max]
        if self._forming and (all_of_it or all(f.done() for _, f in self._queue)):
            self._submit(self._forming, now)
            self._forming = []

    def submit(self, records: Sequence[Any], now: str, *, step: Step | None = None) -> None:
        """Hand one batch, cut by the caller (fair share), to the worker as it is; `step`
        instead of the stage's (records a scheduler fails unrun), in the same order."""
        self.in_flight += len(records)
        self._submit(list(records), now, step)

    def defer(self, cut: Callable[[], Sequence[Any]]) -> None:
        """Queue a batch whose records `cut` chooses on the worker, once the batches before it
        are done: a scheduler (fair share) decides as late as it can. Its records are not
        counted in `in_flight` (the scheduler bounds what waits); a batch that finds no
        records comes back as nothing."""
        self._queue.append((0, self._worker.submit(self._cut_and_run, cut)))
        if self.started_at is None:
            self.started_at = time.monotonic()

    def _cut_and_run(self, cut: Callable[[], Sequence[Any]]) -> BatchResult:
        records = cut()
        return self.step(records, now_iso()) if records else _EMPTY

    @property
    def batches(self) -> int:
        """Batches queued or running on the worker."""
        return len(self._queue)

    def _submit(self, records: list[Any], now: str, step: Step | None = None) -> None:
        future = self._worker.submit(step or self.step, records, now)
        self._queue.append((len(records), future))
        if self.started_at is None:
            self.started_at = time.monotonic()

    def finished(self, *, wait: bool = False) -> list[BatchResult]:
        """Results of the batches done so far, oldest first; `wait` for every one of them.
        A step that raised (a bug: handler errors are outcomes) raises here, in the loop."""
        if wait:
            self.pump(now_iso(), all_of_it=True)
        out = []
        while self._queue and (wait or self._queue[0][1].done()):
            count, future = self._queue.popleft()
            result = future.result()
            if result is not _EMPTY:  # a deferred batch that found nothing to run
                out.append(result)
            self.in_flight -= count
            self.started_at = time.monotonic() if self._queue else None
        return out

    def close(self) -> None:
        self._worker.shutdown(wait=True)
