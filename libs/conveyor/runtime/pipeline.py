"""Pipelined execution: the batch step runs on a worker thread while the loop keeps polling,
producing, acknowledging and committing.

One worker, batches in the order they were read, so results come back in order and offsets are
committed in order up to the lowest unfinished record. In-flight records are bounded: at
`max_in_flight` the loop pauses its partitions (it keeps polling, so the consumer stays in its
group however long a generation takes) and resumes them when the worker catches up. A revoke
waits for the in-flight work (bounded by `max_in_flight`) before the partitions move.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from conveyor.runtime.step import BatchResult

Step = Callable[[Sequence[Any], str], BatchResult]


class Pipeline:
    def __init__(self, step: Step, max_in_flight: int) -> None:
        self.step = step
        self.max_in_flight = max_in_flight
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="handler")
        self._queue: deque[tuple[int, Future[BatchResult]]] = deque()
        self.in_flight = 0  # records submitted, their result not yet taken
        self.started_at: float | None = None  # when the oldest unfinished batch was submitted

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_in_flight

    def submit(self, records: Sequence[Any], now: str) -> None:
        self._queue.append((len(records), self._worker.submit(self.step, records, now)))
        self.in_flight += len(records)
        if self.started_at is None:
            self.started_at = time.monotonic()

    def finished(self, *, wait: bool = False) -> list[BatchResult]:
        """Results of the batches done so far, oldest first; `wait` for every one of them.
        A step that raised (a bug: handler errors are outcomes) raises here, in the loop."""
        out = []
        while self._queue and (wait or self._queue[0][1].done()):
            count, future = self._queue.popleft()
            out.append(future.result())
            self.in_flight -= count
            self.started_at = time.monotonic() if self._queue else None
        return out

    def close(self) -> None:
        self._worker.shutdown(wait=True)
