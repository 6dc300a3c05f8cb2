"""Typed handlers: a stage declares its payload and resources types, and mypy checks the rest.

A `TypedService` is what a service writes: the payload its handler reads (a reader from the
decoded event to a payload class of `conveyor.events.payloads`), a `setup` that builds its
frozen resources object, and a handler of typed `Record`s and a typed `Context`:

    SERVICE = TypedService(
        "moderation", ModerationSettings, payload=payload_of(TaskInferred),
        setup=setup, handle_batch=handle_batch,
    ).service()

`service()` gives the runtime the plain `StageService` it runs, whose handler is an adapter:
it reads each record's payload, then calls the business function. The decode, route and
encode path (codec, step, routing) is untouched: outputs are `Emit`s whose data is a payload's
`to_data()` (`emit`). A record whose data does not fit its payload class (a field missing, a
status that is not a `TaskStatus`) fails alone as a `PermanentError` (dead-lettered); its batch
mates are handled. Payloads are read once per record handed to the handler, and only for those:
every handler reads each record it is given, so reading eagerly costs nothing a handler would
not spend, and a reading error is known before any side effect of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

from conveyor.errors import PermanentError
from conveyor.events.model import Event
from conveyor.events.payloads import PAYLOAD_TYPES, Payload
from conveyor.runtime.handler import BatchOutcome, Emit, Outcome, StageContext, StageService
from conveyor.settings import StageSettings

if TYPE_CHECKING:
    from conveyor.cancel.watch import CancelWatch

S = TypeVar("S", bound=StageSettings)
R = TypeVar("R")
P = TypeVar("P")
_RESOURCES = "typed.resources"  # the key of the typed resources in the runtime's dict
_CONTEXT = "typed.context"  # the typed context, built on the first call


class Readable(Protocol):
    """A payload class: built from the decoded record."""

    @classmethod
    def from_data(cls, d: Mapping[str, Any]) -> Self: ...


T = TypeVar("T", bound=Readable)
Reader = Callable[[Event], P]


def payload_of(cls: type[T]) -> Reader[T]:
    """The reader of a stage that consumes one event type."""

    def read(event: Event) -> T:
        return cls.from_data(event.data)

    return read


def payload_by_type(event: Event) -> Any:
    """The reader of a stage that consumes several types: the class the event's type names.
    A stage declaring it annotates its records with the union of the classes it accepts."""
    return PAYLOAD_TYPES[event.type].from_data(event.data)


def raw_data(event: Event) -> Any:
    """The reader of an edge stage whose data is validated by its own model (preprocess: the
    ingress contract, any JSON); the handler gets the decoded data as it came."""
    return event.data


@dataclass(frozen=True, slots=True)
class Record(Generic[P]):
    """One input record as a handler sees it: its typed data and the event it came in (id,
    time, extensions, attempt)."""

    data: P
    event: Event


@dataclass(frozen=True, slots=True)
class Context(Generic[S, R]):
    """What a typed handler may use: settings, a logger, its resources, and what the runtime
    adds (the stage's cancel watch when it follows cancels, docs/cancellation.md)."""

    stage: str
    settings: S
    log: logging.Logger
    resources: R
    cancels: CancelWatch | None = field(default=None)


def emit(
    payload: Payload,
    *,
    topic: str | None = None,
    discriminator: str = "",
    extensions: Mapping[str, str] | None = None,
) -> Emit:
    """The output event carrying `payload` (its type is the payload class's)."""
    return Emit(
        payload.EVENT_TYPE,
        payload.to_data(),
        topic=topic,
        discriminator=discriminator,
        extensions=extensions if extensions is not None else {},
    )


TypedHandler = Callable[[Record[P], Context[S, R]], Outcome]
TypedBatchHandler = Callable[[Sequence[Record[P]], Context[S, R]], Sequence[BatchOutcome]]


@dataclass(frozen=True, slots=True)
class TypedService(Generic[S, R, P]):
    """A stage with typed payloads and resources: exactly one of `handle` / `handle_batch`."""

    name: str
    settings_type: type[S]
    payload: Reader[P]
    setup: Callable[[S], R]
    handle: TypedHandler[P, S, R] | None = None
    handle_batch: TypedBatchHandler[P, S, R] | None = None
    teardown: Callable[[R], None] | None = None
    accepts: tuple[str, ...] = ()  # event types; empty = what the catalog routes to the stage

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.handle_batch is None):
            raise ValueError(f"stage {self.name}: give exactly one of handle / handle_batch")

    def read(self, event: Event) -> Record[P] | PermanentError:
        """The record's typed payload, or why its data does not fit (permanent)."""
        try:
            return Record(self.payload(event), event)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            return PermanentError(f"{event.type} data does not fit its payload: {exc!r}")

    def run_one(self, event: Event, ctx: Context[S, R]) -> Outcome:
        """Read the event's payload and handle it (`handle` stages)."""
        assert self.handle is not None
        record = self.read(event)
        if isinstance(record, PermanentError):
            raise record
        return self.handle(record, ctx)

    def run_batch(self, events: Sequence[Event], ctx: Context[S, R]) -> list[BatchOutcome]:
        """Read each event's payload and handle the batch; one outcome per event, in order."""
        assert self.handle_batch is not None
        read = [self.read(event) for event in events]
        records = [r for r in read if isinstance(r, Record)]
        if len(records) == len(read):
            return _checked(self.handle_batch(records, ctx), len(records))
        handled = iter(_checked(self.handle_batch(records, ctx), len(records)) if records else ())
        return [r if isinstance(r, PermanentError) else next(handled) for r in read]

    def service(self) -> StageService[S]:
        """The plain stage the runtime runs: adapters around the typed handler."""
        return StageService(
            self.name,
            self.settings_type,
            handle=self._adapt_one if self.handle is not None else None,
            handle_batch=self._adapt_batch if self.handle_batch is not None else None,
            setup=self._setup,
            teardown=self._teardown if self.teardown is not None else None,
            accepts=self.accepts,
        )

    def _setup(self, settings: S) -> dict[str, Any]:
        resources = self.setup(settings)
        runtime: dict[str, Any] = {_RESOURCES: resources}
        # The runtime's fair feed sizes batches by a GPU-aware capacity controller when the
        # resources hold one (conveyor.ml.capacity).
        capacity = getattr(resources, "capacity", None)
        if capacity is not None:
            runtime["capacity"] = capacity
        return runtime

    def _teardown(self, runtime: dict[str, Any]) -> None:
        assert self.teardown is not None
        self.teardown(runtime[_RESOURCES])

    def _context(self, ctx: StageContext[S]) -> Context[S, R]:
        # Built on the first call: by then setup ran and the runtime added its cancel watch.
        typed: Context[S, R] | None = ctx.resources.get(_CONTEXT)
        if typed is None:
            typed = Context(
                ctx.stage,
                ctx.settings,
                ctx.log,
                ctx.resources[_RESOURCES],
                ctx.resources.get("cancels"),
            )
            ctx.resources[_CONTEXT] = typed
        return typed

    def _adapt_one(self, event: Event, ctx: StageContext[Any]) -> Outcome:
        return self.run_one(event, self._context(ctx))

    def _adapt_batch(self, events: Sequence[Event], ctx: StageContext[Any]) -> list[BatchOutcome]:
        return self.run_batch(events, self._context(ctx))


def _checked(outcomes: Sequence[BatchOutcome], expected: int) -> list[BatchOutcome]:
    out = list(outcomes)
    if len(out) != expected:
        raise RuntimeError(f"batch handler returned {len(out)} outcomes for {expected} records")
    return out
