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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.events.catalog import (
    INFERRED_TYPE,
    MODERATED_TYPE,
    PREPROCESSED_TYPE,
    STATUS_TYPE,
    load_catalog,
)
from conveyor.events.catalog import STORED_TYPE as STORED
from conveyor.events.model import ASSIGNED_ID, RERUN, TRACEPARENT, Event
from conveyor.reuse import REUSED
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.store import TaskRecord, TaskStatus, TaskUpdate, is_terminal
from conveyor.store.variantruns import VariantRun
from conveyor.telemetry.traceparent import trace_id_of
from conveyor.telemetry.tracing import span
from conveyor.variants import SHADOW, SHADOWS, VARIANT


def handle_batch(
    events: Sequence[Event], ctx: StageContext[WritebackSettings]
) -> list[BatchOutcome]:
    # A shadow copy's events never touch the task: they are recorded as the shadow's run only.
    updates = [
        None if event.ext(SHADOW) else _retained(update_for(event), ctx.settings)
        for event in events
    ]
    todo = [u for u in updates if u is not None]
    runs = [run for run in map(run_for, events) if run is not None]
    if runs:  # before the task rows: a retried batch merges them again, unchanged
        with span("db upsert variant_runs", {"db.operation.batch.size": len(runs)}):
            ctx.resources["store"].record_variant_runs(runs)
    rows: list[TaskRecord] = []
    if todo:
        with span(
            "db upsert", {"db.operation.name": "upsert", "db.operation.batch.size": len(todo)}
        ):
            # One transaction; RetryableError if the database is down.
            rows = [applied.task for applied in ctx.resources["store"].apply_many(todo)]
    found = iter(rows)
    return [
        _stored(event, update, next(found) if update is not None else None)
        for event, update in zip(events, updates, strict=True)
    ]


def update_for(event: Event) -> TaskUpdate | None:
    """The store update an event makes, or None for events that don't touch the task row."""
    data = event.data
    time = _time(event.time)
    trace_id = trace_id_of(event.ext(TRACEPARENT))
    rerun = event.ext(RERUN)
    if event.type == STATUS_TYPE:
        if data["stage"] == "notify":
            return None  # a notification failure is not a task failure
        rejected = bool(data.get("rejected_record"))
        reason = data.get("reason")
        detail = f"attempt {data['attempt']}: {reason or data['status']}"
        if rejected:
            detail = f"record rejected before decoding, keyed with this task id: {reason}"
        detail = _with_rerun(detail, rerun) or detail
        return TaskUpdate(
            task_id=data["task_id"],
            event_id=event.id,
            event_type=event.type,
            status=data["status"],
            time=time,
            stage=data["stage"],
            tenant=data["tenant"] or None,
            kind=data.get("kind"),
            trace_id=trace_id,
            callback_url=data.get("callback_url"),
            # The reason a status event gives is the task's error when it ends the task.
            error=reason if is_terminal(data["status"]) else None,
            detail=detail[:500],
            override=rerun,
            rejected_record=rejected,
        )
    task = data["task"]
    common = {
        "task_id": task["task_id"],
        "event_id": event.id,
        "event_type": event.type,
        "time": time,
        "stage": _stage_of(event.type),
        "tenant": task["tenant"],
        "kind": task["kind"],
        "trace_id": trace_id,
        "callback_url": task.get("callback_url"),
        "override": rerun,
    }
    if event.type != MODERATED_TYPE:
        return TaskUpdate(
            status=TaskStatus.PROCESSING, detail=_with_rerun(_assigned(event), rerun), **common
        )
    blocked = data["verdict"] == "block"
    return TaskUpdate(
        status=TaskStatus.BLOCKED if blocked else TaskStatus.COMPLETED,
        result=None if blocked else result_of(data),
        verdict=data["verdict"],
        moderation={"scores": data["scores"], "reasons": data["reasons"]},
        detail=_with_rerun(f"verdict {data['verdict']}", rerun),
        **common,
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


def run_for(event: Event) -> VariantRun | None:
    """What an event from inference on says about its variant's run of the task, or None.

    The primary's output is kept only when the task had shadows (to compare with), a shadow's
    always; a failure counts when inference or moderation dead-lettered the run."""
    variant = event.ext(VARIANT)
    if variant is None:
        return None
    shadow = bool(event.ext(SHADOW))
    data = event.data
    if event.type == STATUS_TYPE:
        if data["status"] != "failed" or data["stage"] not in ("inference", "moderation"):
            return None
        return VariantRun(
            tenant=data["tenant"] or None,
            task_id=data["task_id"],
            variant=variant,
            shadow=shadow,
            status="failed",
            kind=data.get("kind"),
            error=(data.get("reason") or "failed")[:500],
            finished_at=_time(event.time),
        )
    if event.type not in (INFERRED_TYPE, MODERATED_TYPE):
        return None
    task = data["task"]
    keep = shadow or bool(event.ext(SHADOWS))
    common = {
        "tenant": task["tenant"] or None,
        "task_id": task["task_id"],
        "variant": variant,
        "shadow": shadow,
        "kind": task["kind"],
        "result": result_of(data) if keep else None,
        "submitted_at": _time(task.get("submitted_at")),
    }
    if event.type == INFERRED_TYPE:
        return VariantRun(status="running", inference_ms=data.get("inference_ms"), **common)
    blocked = data["verdict"] == "block"
    return VariantRun(
        status="blocked" if blocked else "completed",
        verdict=data["verdict"],
        finished_at=_time(event.time),
        **common,
    )


def _assigned(event: Event) -> str | None:
    """A task submitted without an id says, in its timeline, that preprocess gave it one; an
    inferred event whose result was reused names the identical task it came from."""
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


def result_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """The task's result as stored and notified: only the fields its kind produced."""
    out: dict[str, Any] = {"model": data["model"]}
    if data.get("text") is not None:
        out["text"] = data["text"]
    if data.get("embedding") is not None:
        out["embedding"] = data["embedding"]
    if data.get("label") is not None:
        out["label"] = data["label"]
        out["label_scores"] = data["label_scores"]
    return out


def _stored(event: Event, update: TaskUpdate | None, row: TaskRecord | None) -> Emit | None:
    """`stored` when the event's status is the task's stored terminal status (see module doc)."""
    if update is None or row is None or not is_terminal(row.status):
        return None
    if row.status != update.status:
        return None  # a note, or an outcome that lost to the task's earlier one
    data = event.data
    task = data.get("task") or {
        "task_id": row.task_id,
        "tenant": row.tenant or "",
        "kind": row.kind or "unknown",
        "priority": event.ext("priority") or "normal",
        "callback_url": row.callback_url,
        "deadline": event.ext("deadline"),
        "submitted_at": data.get("time") or update.time.isoformat(),
        "model": None,
        "params": {},
    }
    return Emit(
        STORED,
        {
            "task": task,
            "status": row.status,
            "verdict": row.verdict,
            "result": json.dumps(row.result) if row.result is not None else None,
            "error": row.error,
        },
    )


def _time(text: str | None) -> datetime:
    if text:
        try:
            value = datetime.fromisoformat(text)
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        except ValueError:
            pass
    return datetime.now(UTC)
