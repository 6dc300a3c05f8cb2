"""The typed seam between the runtime and a handler (`conveyor.runtime.typed`).

A record whose data does not fit its payload class fails alone, permanently; the handler gets
typed records and resources; the runtime gets the plain `StageService` it runs, with the
capacity controller and teardown wired through.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from conveyor.errors import PermanentError
from conveyor.events.catalog import INFERRED_TYPE, STATUS_TYPE
from conveyor.events.model import Event
from conveyor.events.payloads import TaskInferred, TaskModerated
from conveyor.events.status import StatusData
from conveyor.runtime.handler import BatchOutcome, StageContext
from conveyor.runtime.typed import (
    Context,
    Record,
    TypedService,
    emit,
    payload_by_type,
    payload_of,
)
from conveyor.settings import StageSettings
from conveyor.store.base import TaskStatus
from tests.eventdata import inferred_data

LOG = logging.getLogger("test")


@dataclass(frozen=True, slots=True)
class Resources:
    prefix: str
    capacity: Any = None
    closed: list[str] = field(default_factory=list)


def inferred(task_id: str, **over: Any) -> Event:
    data = {**inferred_data(task_id, text="hello"), **over}
    return Event(id=f"id-{task_id}", type=INFERRED_TYPE, source="/t", subject=task_id, data=data)


def moderate(
    records: Sequence[Record[TaskInferred]], ctx: Context[StageSettings, Resources]
) -> list[BatchOutcome]:
    out: list[BatchOutcome] = []
    for record in records:
        assert isinstance(record.data, TaskInferred)
        text = f"{ctx.resources.prefix}{record.data.text}"
        out.append(
            emit(TaskModerated(task=record.data.task, model="m", text=text, verdict="allow"))
        )
    return out


SERVICE = TypedService(
    "moderation",
    StageSettings,
    payload=payload_of(TaskInferred),
    setup=lambda _s: Resources("checked: ", capacity="controller"),
    handle_batch=moderate,
    teardown=lambda r: r.closed.append("closed"),
)


def typed_context() -> Context[StageSettings, Resources]:
    return Context("moderation", StageSettings(stage="moderation"), LOG, Resources("checked: "))


def test_a_record_whose_data_does_not_fit_fails_alone_and_its_batch_mates_are_handled() -> None:
    broken = inferred("b")
    del broken.data["task"]["submitted_at"]
    out = SERVICE.run_batch([inferred("a"), broken, inferred("c")], typed_context())
    assert isinstance(out[1], PermanentError) and "submitted_at" in str(out[1])
    for emitted, task_id in ((out[0], "a"), (out[2], "c")):
        assert not isinstance(emitted, BaseException) and emitted is not None
        assert emitted.data["task"]["task_id"] == task_id  # type: ignore[union-attr]
        assert emitted.data["text"] == "checked: hello"  # type: ignore[union-attr]


def test_a_batch_of_only_unfit_records_never_calls_the_handler() -> None:
    calls: list[int] = []

    def handler(records: Sequence[Record[TaskInferred]], _ctx: Any) -> list[BatchOutcome]:
        calls.append(len(records))
        return [None] * len(records)

    service = TypedService(
        "moderation",
        StageSettings,
        payload=payload_of(TaskInferred),
        setup=lambda _s: None,
        handle_batch=handler,
    )
    out = service.run_batch([Event("x", INFERRED_TYPE, "/t", "x", {"task": {}})], typed_context())
    assert calls == [] and isinstance(out[0], PermanentError)


def test_a_handler_returning_the_wrong_number_of_outcomes_is_an_error() -> None:
    service = TypedService(
        "moderation",
        StageSettings,
        payload=payload_of(TaskInferred),
        setup=lambda _s: None,
        handle_batch=lambda records, _ctx: [],
    )
    with pytest.raises(RuntimeError, match="0 outcomes for 1"):
        service.run_batch([inferred("a")], typed_context())


def test_the_runtime_gets_a_plain_service_whose_adapter_builds_the_typed_context() -> None:
    plain = SERVICE.service()
    assert plain.name == "moderation" and plain.handle is None and plain.setup is not None
    settings = StageSettings(stage="moderation")
    runtime_resources = plain.setup(settings)
    assert runtime_resources["capacity"] == "controller"  # the fair feed sizes batches by it
    ctx = StageContext("moderation", settings, LOG, runtime_resources)
    ctx.resources["cancels"] = "the watch"  # what the runtime adds after setup
    assert plain.handle_batch is not None
    (out,) = plain.handle_batch([inferred("a")], ctx)
    assert out.data["text"] == "checked: hello"  # type: ignore[union-attr]
    typed = ctx.resources["typed.context"]
    assert typed.cancels == "the watch" and typed.resources.prefix == "checked: "
    plain.handle_batch([inferred("b")], ctx)
    assert ctx.resources["typed.context"] is typed  # built once
    assert plain.teardown is not None
    plain.teardown(ctx.resources)
    assert typed.resources.closed == ["closed"]


def test_a_single_record_stage_raises_the_unfit_records_error_for_the_runtime_to_route() -> None:
    service = TypedService(
        "writeback",
        StageSettings,
        payload=payload_by_type,
        setup=lambda _s: None,
        handle=lambda record, _ctx: None,
    )
    status = Event("s", STATUS_TYPE, "/t", "t", {"task_id": "t", "status": "nope", "stage": "x"})
    with pytest.raises(PermanentError, match="does not fit"):
        service.run_one(status, typed_context())  # type: ignore[arg-type]


def test_payload_by_type_reads_the_class_the_event_type_names() -> None:
    data = {"task_id": "t", "status": "retrying", "stage": "inference", "time": "now"}
    read = payload_by_type(Event("s", STATUS_TYPE, "/t", "t", data))
    assert isinstance(read, StatusData) and read.status is TaskStatus.RETRYING
    assert isinstance(payload_by_type(inferred("a")), TaskInferred)


def test_a_service_needs_exactly_one_handler() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TypedService("x", StageSettings, payload=payload_of(TaskInferred), setup=lambda _s: None)
