"""writeback's decisions: what each event means for the task's row, and when a task is done."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.events.model import Event
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.store import TaskUpdate
from conveyor.telemetry.tracing import span
from services.writeback.settings import WritebackSettings

STORED = "conveyor.task.stored.v1"
_STAGE_OF = {
    "conveyor.task.preprocessed.v1": "preprocess",
    "conveyor.task.inferred.v1": "inference",
    "conveyor.task.moderated.v1": "moderation",
}
_TERMINAL = ("completed", "blocked", "failed", "expired")


def handle_batch(
    events: Sequence[Event], ctx: StageContext[WritebackSettings]
) -> list[BatchOutcome]:
    updates = [update_for(event) for event in events]
    todo = [u for u in updates if u is not None]
    if todo:
        with span(
            "db upsert", {"db.operation.name": "upsert", "db.operation.batch.size": len(todo)}
        ):
            ctx.resources["store"].apply_many(todo)  # one transaction; RetryableError if DB is down
    return [_stored(event, update) for event, update in zip(events, updates, strict=True)]


def update_for(event: Event) -> TaskUpdate | None:
    """The store update an event makes, or None for events that don't touch the task row."""
    data = event.data
    time = _time(event.time)
    trace_id = _trace_id(event)
    if event.type == "conveyor.task.status.v1":
        if data["stage"] == "notify":
            return None  # a notification failure is not a task failure
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
            error=data.get("reason") if data["status"] in ("failed", "expired") else None,
            detail=f"attempt {data['attempt']}: {data.get('reason') or data['status']}"[:500],
        )
    task = data["task"]
    common = {
        "task_id": task["task_id"],
        "event_id": event.id,
        "event_type": event.type,
        "time": time,
        "stage": _STAGE_OF.get(event.type),
        "tenant": task["tenant"],
        "kind": task["kind"],
        "trace_id": trace_id,
        "callback_url": task.get("callback_url"),
    }
    if event.type != "conveyor.task.moderated.v1":
        return TaskUpdate(status="processing", **common)
    blocked = data["verdict"] == "block"
    return TaskUpdate(
        status="blocked" if blocked else "completed",
        result=None if blocked else result_of(data),
        verdict=data["verdict"],
        moderation={"scores": data["scores"], "reasons": data["reasons"]},
        detail=f"verdict {data['verdict']}",
        **common,
    )


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


def _stored(event: Event, update: TaskUpdate | None) -> Emit | None:
    if update is None or update.status not in _TERMINAL:
        return None
    data = event.data
    task = data.get("task") or {
        "task_id": update.task_id,
        "tenant": update.tenant or "",
        "kind": update.kind or "unknown",
        "priority": event.ext("priority") or "normal",
        "callback_url": update.callback_url,
        "deadline": event.ext("deadline"),
        "submitted_at": data.get("time") or update.time.isoformat(),
        "model": None,
        "params": {},
    }
    return Emit(
        STORED,
        {
            "task": task,
            "status": update.status,
            "verdict": update.verdict,
            "result": json.dumps(update.result) if update.result is not None else None,
            "error": update.error,
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


def _trace_id(event: Event) -> str | None:
    parts = (event.ext("traceparent") or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None
