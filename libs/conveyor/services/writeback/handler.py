"""writeback's decisions: what each event means for the task's row, and when a task is done.

The store's precedence rule decides which event sets a task's status (a finished task stays
finished); writeback says what each event claims. A status event about a record rejected before
it decoded (`rejected_record`) claims only a `failed` task that does not exist yet, and is a
timeline note otherwise. An event carrying `rerun` belongs to an operator redrive or replay of
the task: it may replace a terminal status, and its timeline entry names the operator action.
`stored` is emitted when the task's stored status is terminal and is the one the event brought,
so a note, or a failure that lost to an earlier outcome, notifies nobody; a redelivered event
emits it again (same id: notify deduplicates). An event naming its model `variant` also records
that variant's run (`variant_runs`); the events of a shadow copy (`shadow`) record only that, so
a shadow's output never becomes the task's result and never emits `stored` (docs/variants.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor.events.catalog import INFERRED_TYPE, PREPROCESSED_TYPE, load_catalog
from conveyor.events.model import ASSIGNED_ID, RERUN, TRACEPARENT
from conveyor.events.payloads import (
    Task,
    TaskInferred,
    TaskModerated,
    TaskPreprocessed,
    TaskStored,
)
from conveyor.events.status import StatusData
from conveyor.retention import Sweeper
from conveyor.reuse import REUSED
from conveyor.runtime import Emit
from conveyor.runtime.handler import BatchOutcome
from conveyor.runtime.typed import Context, Record, emit
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.store import TaskRecord, TaskStatus, TaskUpdate, is_terminal
from conveyor.store.base import ResultStore
from conveyor.store.variantruns import RUNNING, VariantRun
from conveyor.telemetry.traceparent import trace_id_of
from conveyor.telemetry.tracing import span
from conveyor.variants import SHADOW, SHADOWS, VARIANT

# What writeback consumes (the catalog routes these four types to it).
WritebackPayload = TaskPreprocessed | TaskInferred | TaskModerated | StatusData
Input = Record[WritebackPayload]
# The stages whose dead-lettered run of a variant counts as that variant's failure.
_VARIANT_STAGES = ("inference", "moderation")


@dataclass(frozen=True, slots=True)
class WritebackResources:
    """writeback's result store (the retention sweeper runs beside it, in `__main__`)."""

    store: ResultStore
    sweeper: Sweeper | None = None  # the retention sweep beside the stage, stopped at teardown


def handle_batch(
    records: Sequence[Input], ctx: Context[WritebackSettings, WritebackResources]
) -> list[BatchOutcome]:
    # A shadow copy's events never touch the task: they are recorded as the shadow's run only.
    updates = [
        None if record.event.ext(SHADOW) else _retained(update_for(record), ctx.settings)
        for record in records
    ]
    todo = [u for u in updates if u is not None]
    runs = [run for run in map(run_for, records) if run is not None]
    store = ctx.resources.store
    if runs:  # before the task rows: a retried batch merges them again, unchanged
        with span("db upsert variant_runs", {"db.operation.batch.size": len(runs)}):
            store.record_variant_runs(runs)
    rows: list[TaskRecord] = []
    if todo:
        with span(
            "db upsert", {"db.operation.name": "upsert", "db.operation.batch.size": len(todo)}
        ):
            # One transaction; RetryableError if the database is down.
            rows = [applied.task for applied in store.apply_many(todo)]
    found = iter(rows)
    return [
        _stored(record, update, next(found) if update is not None else None)
        for record, update in zip(records, updates, strict=True)
    ]


def update_for(record: Input) -> TaskUpdate | None:
    """The store update an event makes, or None for events that don't touch the task row."""
    data, event = record.data, record.event
    if isinstance(data, StatusData):
        return _status_update(record, data)
    task = data.task
    common: dict[str, Any] = {
        "task_id": task.task_id,
        "event_id": event.id,
        "event_type": event.type,
        "time": _time(event.time),
        "stage": _stage_of(event.type),
        "tenant": task.tenant,
        "kind": task.kind,
        "trace_id": trace_id_of(event.ext(TRACEPARENT)),
        "callback_url": task.callback_url,
        "override": event.ext(RERUN),
    }
    if not isinstance(data, TaskModerated):
        detail = _with_rerun(_assigned(record), event.ext(RERUN))
        return TaskUpdate(status=TaskStatus.PROCESSING, detail=detail, **common)
    return TaskUpdate(
        status=TaskStatus.BLOCKED if data.blocked else TaskStatus.COMPLETED,
        result=None if data.blocked else result_of(data),
        verdict=data.verdict,
        moderation={"scores": dict(data.scores), "reasons": list(data.reasons)},
        detail=_with_rerun(f"verdict {data.verdict}", event.ext(RERUN)),
        **common,
    )


def _status_update(record: Input, data: StatusData) -> TaskUpdate | None:
    if data.stage == "notify":
        return None  # a notification failure is not a task failure
    event = record.event
    rerun = event.ext(RERUN)
    detail = f"attempt {data.attempt}: {data.reason or data.status.value}"
    if data.rejected_record:
        detail = f"record rejected before decoding, keyed with this task id: {data.reason}"
    detail = _with_rerun(detail, rerun) or detail
    return TaskUpdate(
        task_id=data.task_id,
        event_id=event.id,
        event_type=event.type,
        status=data.status,
        time=_time(event.time),
        stage=data.stage,
        tenant=data.tenant or None,
        kind=data.kind,
        trace_id=trace_id_of(event.ext(TRACEPARENT)),
        callback_url=data.callback_url,
        # The reason a status event gives is the task's error when it ends the task.
        error=data.reason if is_terminal(data.status) else None,
        detail=detail[:500],
        override=rerun,
        rejected_record=data.rejected_record,
    )


def _stage_of(event_type: str) -> str | None:
    """The stage whose output `event_type` is (the catalog's producer): the task's stage."""
    spec = load_catalog().spec(event_type)
    return spec.producer if spec is not None else None


def _retained(update: TaskUpdate | None, settings: WritebackSettings) -> TaskUpdate | None:
    """A terminal update carries the tenant's retention: the store stamps `expires_at`."""
    if update is None or not is_terminal(update.status):
        return update
    return dataclasses.replace(update, retain_s=settings.retain_s(update.tenant))


def run_for(record: Input) -> VariantRun | None:
    """What an event from inference on says about its variant's run of the task, or None.

    The primary's output is kept only when the task had shadows (to compare with), a shadow's
    always; a failure counts when inference or moderation dead-lettered the run."""
    event, data = record.event, record.data
    variant = event.ext(VARIANT)
    if variant is None:
        return None
    shadow = bool(event.ext(SHADOW))
    if isinstance(data, StatusData):
        if data.status is not TaskStatus.FAILED or data.stage not in _VARIANT_STAGES:
            return None
        return VariantRun(
            tenant=data.tenant or None,
            task_id=data.task_id,
            variant=variant,
            shadow=shadow,
            status=TaskStatus.FAILED,
            kind=data.kind,
            error=(data.reason or "failed")[:500],
            finished_at=_time(event.time),
        )
    if isinstance(data, TaskPreprocessed):
        return None
    task = data.task
    keep = shadow or bool(event.ext(SHADOWS))
    common: dict[str, Any] = {
        "tenant": task.tenant or None,
        "task_id": task.task_id,
        "variant": variant,
        "shadow": shadow,
        "kind": task.kind,
        "result": result_of(data) if keep else None,
        "submitted_at": _time(task.submitted_at),
    }
    if isinstance(data, TaskInferred):
        return VariantRun(status=RUNNING, inference_ms=data.inference_ms, **common)
    return VariantRun(
        status=TaskStatus.BLOCKED if data.blocked else TaskStatus.COMPLETED,
        verdict=data.verdict,
        finished_at=_time(event.time),
        **common,
    )


def _assigned(record: Input) -> str | None:
    """A task submitted without an id says, in its timeline, that preprocess gave it one; an
    inferred event whose result was reused names the identical task it came from."""
    event = record.event
    if event.type == INFERRED_TYPE and (source := event.ext(REUSED)):
        return f"result reused from identical task {source} (model not run)"
    origin = event.ext(ASSIGNED_ID)
    if origin is None or event.type != PREPROCESSED_TYPE:
        return None
    return f"task id assigned by preprocess (submitted without one; derived from {origin})"


def _with_rerun(detail: str | None, rerun: str | None) -> str | None:
    """The timeline names the operator action an event belongs to."""
    if rerun is None:
        return detail
    return f"operator {rerun}: {detail}" if detail else f"operator {rerun}"


def result_of(data: TaskInferred | TaskModerated) -> dict[str, Any]:
    """The task's result as stored and notified: only the fields its kind produced."""
    out: dict[str, Any] = {"model": data.model}
    if data.text is not None:
        out["text"] = data.text
    if data.embedding is not None:
        out["embedding"] = list(data.embedding)
    if data.label is not None:
        out["label"] = data.label
        out["label_scores"] = dict(data.label_scores)
    return out


def _stored(record: Input, update: TaskUpdate | None, row: TaskRecord | None) -> Emit | None:
    """`stored` when the event's status is the task's stored terminal status (see module doc)."""
    if update is None or row is None or not is_terminal(row.status):
        return None
    if row.status != update.status:
        return None  # a note, or an outcome that lost to the task's earlier one
    data = record.data
    task = data.task if not isinstance(data, StatusData) else _task_of(record, data, row, update)
    stored = TaskStored(
        task=task,
        status=TaskStatus(row.status),
        verdict=row.verdict,
        result=json.dumps(row.result) if row.result is not None else None,
        error=row.error,
    )
    return emit(stored)


def _task_of(record: Input, data: StatusData, row: TaskRecord, update: TaskUpdate) -> Task:
    """The task context of a task a status event ended (a status event carries none)."""
    event = record.event
    return Task(
        task_id=row.task_id,
        tenant=row.tenant or "",
        kind=row.kind or "unknown",
        priority=event.ext("priority") or "normal",
        callback_url=row.callback_url,
        deadline=event.ext("deadline"),
        submitted_at=data.time or update.time.isoformat(),
        model=None,
        params={},
    )


def _time(text: str | None) -> datetime:
    if text:
        try:
            value = datetime.fromisoformat(text)
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)
