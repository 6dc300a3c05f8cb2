"""The stage-side check that drops the tasks of a stopped batch instead of running them.

A batch cancelled or expired has already ended its unfinished tasks in the store (`lifecycle`),
so a stage that meets one of its tasks later has nothing to record: it only saves the work. The
task's batch is read from its id (`<batch id>.<line>`), so a task of no batch costs a prefix
test. The batch's status is read from the store at most every `ttl_s` per batch; a stopped batch
stays stopped, so that answer is kept for good (within `max_size` batches). The check fails
open: when the store does not answer, the task runs, and its late outcome loses to the status
the store already has. Inference uses it (`conveyor.services.inference`), given the store's URL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pydantic import SecretStr

from conveyor.batches.lifecycle import batch_of_task
from conveyor.store import open_store
from conveyor.store.batches import BATCH_STOPPED, BatchStore

log = logging.getLogger(__name__)

# How stale a "still running" answer may be: a cancelled batch's tasks stop within this.
DEFAULT_TTL_S = 2.0


class StoppedBatches:
    def __init__(
        self,
        store: BatchStore,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_size = max_size
        self.clock = clock
        self._close = close
        # (tenant, batch id) -> (stopped, monotonic time after which to ask again)
        self._known: dict[tuple[str, str], tuple[bool, float]] = {}

    def stopped(self, tenant: str, task_id: str) -> bool:
        """Whether the task belongs to a batch that was cancelled or expired."""
        batch_id = batch_of_task(task_id)
        if batch_id is None:
            return False
        key = (tenant, batch_id)
        now = self.clock()
        known = self._known.get(key)
        if known is not None and (known[0] or now < known[1]):
            return known[0]
        try:
            batch = self.store.get_batch(tenant, batch_id)
        except Exception as exc:  # fail open: see the module docstring
            log.warning("batch status unavailable batch_id=%s error=%s", batch_id, exc)
            return False
        stopped = batch is not None and batch.status in BATCH_STOPPED
        if len(self._known) >= self.max_size:
            self._known.clear()  # rare; the next look-ups refill it
        self._known[key] = (stopped, now + self.ttl_s)
        return stopped

    def close(self) -> None:
        if self._close is not None:
            self._close()


def stopped_batches(
    store_url: SecretStr | None, *, ttl_s: float = DEFAULT_TTL_S
) -> StoppedBatches | None:
    """The check on the store at `store_url`, or None when no store is configured."""
    if store_url is None:
        return None
    store = open_store(store_url)
    assert isinstance(store, BatchStore)  # both backends are
    return StoppedBatches(store, ttl_s=ttl_s, close=store.close)
