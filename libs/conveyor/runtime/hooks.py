"""Telemetry hooks: what the batch step tells tracing, metrics and the event log.

The runtime calls a `StageHooks` object at the start and finish of each record and of each
handler call; it never calls tracing or metrics module functions itself. `StageTelemetry`
(`conveyor.runtime.telemetry`) is the real one; unit tests pass a recording fake. A hook must
not raise: telemetry never fails the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from opentelemetry.trace import Span

from conveyor.events.model import Event

if TYPE_CHECKING:
    from conveyor.kafka.protocols import Message
    from conveyor.runtime.routing import Item, OutRecord
    from conveyor.runtime.step import BatchResult, RecordOutcome


class StageHooks(Protocol):
    def record_start(self, msg: Message, headers: Mapping[str, str], event: Event | None) -> Span:
        """A record was decoded (`event` None: it could not be); returns the span it carries
        (the API's invalid span when there is none)."""
        ...

    def record_finish(self, outcome: RecordOutcome, error: BaseException | None = None) -> None:
        """A record's outcome is known (emitted, retried or dead-lettered)."""
        ...

    def record_enter(self, item: Item) -> object:
        """A per-record handler is about to run for `item`; the token goes to `record_exit`."""
        ...

    def record_exit(self, token: object) -> None: ...

    def batch_enter(self, items: Sequence[Item]) -> object:
        """A batch handler is about to run for `items`; the token goes to `batch_exit`."""
        ...

    def batch_exit(self, token: object) -> None: ...

    def handler_start(self, items: Sequence[Item]) -> object:
        """The handler (per record or batch) starts on a batch; the token goes to the finish."""
        ...

    def handler_finish(self, token: object, items: Sequence[Item]) -> None: ...

    def batch_finish(self, result: BatchResult) -> None:
        """A batch was processed (per-batch counters)."""
        ...

    def delivered(self, outputs: Sequence[OutRecord]) -> None:
        """The broker acknowledged these records."""
        ...
