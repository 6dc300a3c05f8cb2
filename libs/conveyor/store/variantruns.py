"""Variant runs: one row per (tenant, task id, variant), primary and shadow, for comparison.

The task's own row (`tasks`) keeps its result as before; `variant_runs` records, per variant that
ran the task, its status, model time, moderation verdict, error and timing. A shadow's output is
kept here and nowhere else (it never reaches `tasks`, so no result, webhook or WebSocket carries
it); a primary's output is copied here only when the task had shadows, so `conveyor variants
report` can measure agreement without doubling every task's storage. `conveyor variants report`
reads this table alone.

Merge rule (one SQL statement, the same in both backends): `running` never replaces a finished
status (completed, blocked, failed), a finished status replaces any, and a value an update leaves
NULL never erases one already stored, so the order in which writeback sees a run's events does
not matter. A `blocked` run's output is withheld (NULL), as the task's is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.store.base import dump_json, load_json, tenant_key

RUNNING = "running"
RUN_STATUSES = frozenset({RUNNING, "completed", "blocked", "failed"})

RUN_COLUMNS = (
    "tenant",
    "task_id",
    "variant",
    "shadow",
    "kind",
    "status",
    "inference_ms",
    "result",
    "verdict",
    "error",
    "submitted_at",
    "finished_at",
)


def run_schema(time_type: str) -> str:
    """The table, in a dialect whose timestamp type is `time_type`."""
    return f"""
CREATE TABLE IF NOT EXISTS variant_runs (
    tenant       TEXT NOT NULL DEFAULT '',
    task_id      TEXT NOT NULL,
    variant      TEXT NOT NULL,
    shadow       INTEGER NOT NULL DEFAULT 0,
    kind         TEXT,
    status       TEXT NOT NULL,
    inference_ms DOUBLE PRECISION,
    result       TEXT,
    verdict      TEXT,
    error        TEXT,
    submitted_at {time_type},
    finished_at  {time_type},
    PRIMARY KEY (tenant, task_id, variant)
);
CREATE INDEX IF NOT EXISTS variant_runs_kind_idx ON variant_runs (kind, variant)
"""


def run_upsert(placeholder: str) -> str:
    """The merge statement, with the dialect's parameter `placeholder` (`?` or `%s`)."""
    finished = "('completed', 'blocked', 'failed')"
    return (
        f"INSERT INTO variant_runs ({', '.join(RUN_COLUMNS)}) "
        f"VALUES ({', '.join([placeholder] * len(RUN_COLUMNS))}) "
        "ON CONFLICT (tenant, task_id, variant) DO UPDATE SET "
        f"status = CASE WHEN excluded.status = '{RUNNING}' "
        f"AND variant_runs.status IN {finished} THEN variant_runs.status "
        "ELSE excluded.status END, "
        "inference_ms = COALESCE(excluded.inference_ms, variant_runs.inference_ms), "
        "result = CASE WHEN excluded.status = 'blocked' OR variant_runs.status = 'blocked' "
        "THEN NULL ELSE COALESCE(excluded.result, variant_runs.result) END, "
        "verdict = COALESCE(excluded.verdict, variant_runs.verdict), "
        "error = CASE WHEN excluded.status IN ('completed', 'blocked') THEN NULL "
        "ELSE COALESCE(excluded.error, variant_runs.error) END, "
        "kind = COALESCE(variant_runs.kind, excluded.kind), "
        "submitted_at = COALESCE(variant_runs.submitted_at, excluded.submitted_at), "
        "finished_at = COALESCE(excluded.finished_at, variant_runs.finished_at)"
    )


RUN_SELECT = f"SELECT {', '.join(RUN_COLUMNS)} FROM variant_runs"


@dataclass(frozen=True, slots=True)
class VariantRun:
    """What one event says about one variant's run of one task."""

    tenant: str | None
    task_id: str
    variant: str
    shadow: bool
    status: str
    kind: str | None = None
    inference_ms: float | None = None
    result: Any = None  # JSON-serialisable; withheld when blocked
    verdict: str | None = None
    error: str | None = None
    submitted_at: datetime | None = None
    finished_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.status not in RUN_STATUSES:
            raise ValueError(f"unknown variant run status {self.status!r}")

    @property
    def finished(self) -> bool:
        return self.status != RUNNING


def run_params(run: VariantRun, from_time: Callable[[datetime | None], Any]) -> tuple[Any, ...]:
    """Parameters of `run_upsert` in `RUN_COLUMNS` order."""
    return (
        tenant_key(run.tenant),
        run.task_id,
        run.variant,
        int(run.shadow),
        run.kind,
        run.status,
        run.inference_ms,
        None if run.status == "blocked" else dump_json(run.result),
        run.verdict,
        run.error,
        from_time(run.submitted_at),
        from_time(run.finished_at),
    )


def run_from_row(row: Sequence[Any], to_time: Callable[[Any], datetime | None]) -> VariantRun:
    values = dict(zip(RUN_COLUMNS, row, strict=True))
    return VariantRun(
        tenant=values["tenant"] or None,
        task_id=values["task_id"],
        variant=values["variant"],
        shadow=bool(values["shadow"]),
        status=values["status"],
        kind=values["kind"],
        inference_ms=values["inference_ms"],
        result=load_json(values["result"]),
        verdict=values["verdict"],
        error=values["error"],
        submitted_at=to_time(values["submitted_at"]),
        finished_at=to_time(values["finished_at"]),
    )
