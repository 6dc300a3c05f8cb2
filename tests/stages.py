"""Unit tests' way into a stage: its typed seam (payload read from the event, then the handler),
with a typed context holding the resources the test gives (fakes for models, HTTP, time)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from conveyor.events.model import Event
from conveyor.runtime.handler import BatchOutcome, Outcome
from conveyor.runtime.typed import Context
from conveyor.services.inference.__main__ import INFERENCE
from conveyor.services.moderation.__main__ import MODERATION
from conveyor.services.notify.__main__ import NOTIFY
from conveyor.services.preprocess.__main__ import PREPROCESS
from conveyor.services.writeback.__main__ import WRITEBACK

LOG = logging.getLogger("test")


def context(settings: Any, resources: Any, *, stage: str = "test", cancels: Any = None) -> Any:
    """The typed context a stage's handler gets (`cancels`: the stage's cancel watch)."""
    return Context(stage, settings, LOG, resources, cancels)


def preprocess(event: Event, ctx: Context[Any, Any]) -> Outcome:
    return PREPROCESS.run_one(event, ctx)


def infer(events: Sequence[Event], ctx: Context[Any, Any]) -> list[BatchOutcome]:
    return INFERENCE.run_batch(events, ctx)


def moderate(events: Sequence[Event], ctx: Context[Any, Any]) -> list[BatchOutcome]:
    return MODERATION.run_batch(events, ctx)


def write_back(events: Sequence[Event], ctx: Context[Any, Any]) -> list[BatchOutcome]:
    return WRITEBACK.run_batch(events, ctx)


def notify(events: Sequence[Event], ctx: Context[Any, Any]) -> list[BatchOutcome]:
    return NOTIFY.run_batch(events, ctx)
