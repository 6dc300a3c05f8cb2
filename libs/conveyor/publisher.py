"""Submitting tasks from asyncio code, one broker acknowledgement awaited per task.

`AsyncTaskPublisher` wraps one `TaskClient` (one idempotent producer for the whole process). A
request awaits its own record's delivery report rather than calling `flush()`, which would block
a thread until every record in flight, other requests' included, was acknowledged. Delivery
reports are served by a background thread polling the producer; each report settles the waiting
request's future on its event loop. Used by the gateway; any asyncio front end can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from conveyor.client import TaskClient
from conveyor.errors import BrokerError

log = logging.getLogger(__name__)


class TaskPublisher(Protocol):
    """What an asyncio front end needs to submit tasks (fakes implement it in unit tests)."""

    async def submit(self, task: Mapping[str, Any]) -> tuple[str, str | None]:
        """Validate, send and await the broker's acknowledgement; returns (task id, trace id).

        Raises `PermanentError` for an invalid task and `BrokerError` when the broker did not
        acknowledge the record in time (it may still arrive later).
        """
        ...

    def start(self) -> None: ...

    def close(self) -> None: ...


class AsyncTaskPublisher:
    def __init__(self, client: TaskClient, *, ack_timeout_s: float = 5.0) -> None:
        self.client = client
        self.ack_timeout_s = ack_timeout_s
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="delivery-reports", daemon=True)

    def start(self) -> None:
        self._poller.start()

    async def submit(self, task: Mapping[str, Any]) -> tuple[str, str | None]:
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[str | None] = loop.create_future()

        def on_delivery(err: Any, _msg: Any) -> None:  # runs on the poller thread
            # RuntimeError: the loop has closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, acked, None if err is None else str(err))

        # A full local queue (the broker is not keeping up) is not waited out here: that
        # would block the event loop; the request fails with BrokerError at once.
        task_id, trace_id = self.client.submit(task, on_delivery=on_delivery, queue_wait_s=0)
        try:
            error = await asyncio.wait_for(acked, self.ack_timeout_s)
        except TimeoutError:
            raise BrokerError(f"no broker acknowledgement within {self.ack_timeout_s}s") from None
        if error is not None:
            raise BrokerError(f"publish failed: {error}")
        return task_id, trace_id

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the poller and give records in flight `timeout_s` to be acknowledged."""
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join(timeout_s)
        left = self.client.producer.flush(timeout_s)
        if left:
            log.warning("publisher closed with unacknowledged records count=%d", left)

    def _poll(self) -> None:
        # 100 ms bounds both the shutdown delay and the latency of a delivery report.
        while not self._stop.is_set():
            self.client.producer.poll(0.1)


def _settle(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():  # a request that timed out has stopped waiting
        future.set_result(error)
