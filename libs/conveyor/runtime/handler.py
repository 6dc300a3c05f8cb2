"""What a service gives the runtime: a handler, its settings, and optional setup/teardown.

A handler is a pure function of its input: it receives the decoded event and a `StageContext`
and returns what to emit (`Emit`, a sequence of them, or None). It never produces, sleeps,
commits or retries itself; it raises `RetryableError` or `PermanentError` and the runtime
decides. A batch handler receives a list of events (dynamic batching) and returns one outcome
per event, in order: emits, or the exception that record failed with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from conveyor.events.catalog import STATUS_TOPIC, STATUS_TYPE
from conveyor.events.model import Event
from conveyor.events.status import StatusData
from conveyor.settings import StageSettings

S = TypeVar("S", bound=StageSettings)


@dataclass(frozen=True, slots=True)
class Emit:
    """One output event. The runtime fills id, source, subject, time, tracing and extensions.

    `topic` defaults to the catalog's (first) topic for `type`; `discriminator` makes the
    deterministic id unique when one task emits several events of one type (status events).
    `extensions` adds to or overrides the extensions carried over from the input.
    """

    type: str
    data: Mapping[str, Any]
    topic: str | None = None
    discriminator: str = ""
    extensions: Mapping[str, str] = field(default_factory=dict)


Outcome = Emit | Sequence[Emit] | None
BatchOutcome = Outcome | BaseException


@dataclass(slots=True)
class StageContext(Generic[S]):
    """What a handler may use: its settings, a logger, and the resources `setup` made."""

    stage: str
    settings: S
    log: logging.Logger
    resources: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Event, StageContext[Any]], Outcome]
BatchHandler = Callable[[Sequence[Event], StageContext[Any]], Sequence[BatchOutcome]]


@dataclass(frozen=True, slots=True)
class StageService(Generic[S]):
    """A stage: exactly one of `handle` / `handle_batch`, its settings class, setup/teardown."""

    name: str
    settings_type: type[S]
    handle: Handler | None = None
    handle_batch: BatchHandler | None = None
    setup: Callable[[S], dict[str, Any]] | None = None
    teardown: Callable[[dict[str, Any]], None] | None = None
    accepts: tuple[str, ...] = ()  # event types; empty = what the catalog routes to the stage

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.handle_batch is None):
            raise ValueError(f"stage {self.name}: give exactly one of handle / handle_batch")


def status_emit(
    data: StatusData, *, discriminator: str, extensions: Mapping[str, str] | None = None
) -> Emit:
    """The status event reporting `data`, on the status topic; `discriminator` tells one
    task's status events apart (their deterministic ids)."""
    return Emit(
        STATUS_TYPE,
        data.record(),
        topic=STATUS_TOPIC,
        discriminator=discriminator,
        extensions=dict(extensions or {}),
    )
