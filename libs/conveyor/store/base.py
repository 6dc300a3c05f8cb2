"""The result store contract: status model, records, precedence rule, `ResultStore` protocol.

A task is identified by (tenant, task id): two tenants' equal task ids are two tasks, with
their own rows, timelines and notifications (a task that names no tenant has the tenant key "",
read back as None). A task's row in `tasks` is the merge of every event seen for it;
`task_events` keeps each event once (primary key = CloudEvent id, which includes the tenant),
which both deduplicates redelivered records and forms the timeline. The gateway reserves a task
(`reserve`: a `pending` row, inserted only if (tenant, task id) is free) before it publishes it,
so one id is accepted once per tenant, also across gateway replicas.
Status precedence is one function, `status_wins`, and makes the merge independent of
arrival order. A finished task stays finished: a terminal status (completed, blocked, failed,
expired, cancelled) is never replaced, except by an event of an explicit operator re-run of the
task (`conveyor dlq redrive` / `conveyor replay`, carried as `TaskUpdate.override`) that is newer
than the stored status; the timeline names the re-run. A terminal status replaces a
non-terminal one whatever the times; between two non-terminal ones the newer event time wins
(ties: `processing`/`retrying` beat `pending`, otherwise the stored row stays).
A record rejected before it decoded names its task by its record key alone, which is not
trustworthy (`TaskUpdate.rejected_record`): it becomes a `rejected-record` timeline note of an
existing task and changes nothing else, or, when no task has that id, a `failed` task; without a
tenant it is attributed to the one task of that id, if there is exactly one.
Fields an update leaves as None never erase stored values; a losing update may still fill a NULL
trace id, but never touches the outcome (`stage`, result, verdict, moderation, error), so a late
failure leaves no error on a completed task; `stage` is the stage of the event that set the
status. `tenant`, `kind` and `callback_url` are fixed by the
first event that names them (no event can move a task to another tenant). The
result of a `blocked` task is always withheld (NULL). All timestamps are event times (the
CloudEvent `time`), timezone-aware UTC, so replays rebuild the same rows; `updated_at` is the time
of the event that set the current status, `created_at` the earliest event time seen,
`completed_at` the time of the terminal event. One store, `sql.py`, over the dialects
`sqlite.py` and `postgres.py`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from conveyor.store.variantruns import VariantRun


class AmbiguousTaskError(ValueError):
    """A task id asked for without a tenant names tasks of several tenants."""

    def __init__(self, task_id: str, tenants: Sequence[str]) -> None:
        names = ", ".join(repr(t) for t in tenants)
        super().__init__(f"task id {task_id!r} exists for several tenants ({names}): name one")
        self.tenants = tuple(tenants)


def tenant_key(tenant: str | None) -> str:
    """The tenant part of a task's store key: a task that names no tenant has the key ""."""
    return tenant or ""


class TaskStatus(StrEnum):
    """Lifecycle of a task; the five last values are terminal."""

    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    COMPLETED = "completed"
    BLOCKED = "blocked"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"  # set by a cancel (conveyor.cancel, docs/cancellation.md)


STATUSES: frozenset[str] = frozenset(s.value for s in TaskStatus)
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {
        TaskStatus.COMPLETED,
        TaskStatus.BLOCKED,
        TaskStatus.FAILED,
        TaskStatus.EXPIRED,
        TaskStatus.CANCELLED,
    }
)
# The timeline entry of a record rejected before it decoded: a note, not a task status.
REJECTED_RECORD = "rejected-record"
VERDICTS: frozenset[str] = frozenset({"allow", "flag", "block"})

# Notification claim states: a claim is taken before the webhook is sent, then completed.
NOTIFICATION_CLAIMED = "claimed"
NOTIFICATION_DELIVERED = "delivered"  # 2xx/3xx answer
NOTIFICATION_REJECTED = "rejected"  # 4xx/5xx answer recorded as final by the notify service


def is_terminal(status: str) -> bool:
    """True for completed, blocked, failed, expired and cancelled."""
    return status in TERMINAL_STATUSES


def _rank(status: str) -> int:
    # Only breaks ties between events with the same time: work in progress beats `pending`.
    return 0 if status == TaskStatus.PENDING else 1


def status_wins(
    current_status: str | None,
    current_time: datetime | None,
    new_status: str,
    new_time: datetime,
    *,
    override: bool = False,
) -> bool:
    """Whether an event with `new_status` at `new_time` replaces the stored status.

    The one precedence rule of both stores (see the module docstring): a terminal status is
    final unless `override` (an operator re-run of the task) brings a newer event; terminal
    beats non-terminal regardless of time; otherwise the newer time wins, and on equal times
    the stored status stays unless a `pending` is being superseded by work in progress.
    """
    if current_status is None or current_time is None:
        return True
    if is_terminal(current_status):
        return override and new_time > current_time
    if is_terminal(new_status):
        return True
    return (new_time, _rank(new_status)) > (current_time, _rank(current_status))


def _require_utc(name: str, value: datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value!r}")


@dataclass(frozen=True, slots=True)
class TaskUpdate:
    """One event's contribution to a task: an event row plus the fields it knows about."""

    task_id: str
    event_id: str  # CloudEvent id: the deduplication key
    event_type: str
    status: str
    time: datetime  # CloudEvent time, timezone-aware
    stage: str | None = None
    tenant: str | None = None
    kind: str | None = None
    result: Any = None  # JSON-serialisable; withheld (never stored) when status is blocked
    verdict: str | None = None
    moderation: Any = None  # JSON-serialisable scores and reasons
    trace_id: str | None = None
    error: str | None = None
    callback_url: str | None = None
    detail: str | None = None  # short timeline text, e.g. "attempt 2: timeout"
    # The operator re-run this event belongs to (e.g. "redrive conveyor.inference.dlq:0:7"):
    # only such an event may replace a terminal status, and only with a newer one.
    override: str | None = None
    # The event reports a record rejected before it decoded, attributed by its record key alone:
    # a note on an existing task, a `failed` task only when no task has that id.
    rejected_record: bool = False
    # Retention (conveyor.retention): a terminal status set by this event makes the task expire
    # this many seconds after the event's time; None keeps it for ever.
    retain_s: float | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown task status {self.status!r}")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"unknown moderation verdict {self.verdict!r}")
        _require_utc("time", self.time)

    @property
    def entry_status(self) -> str:
        """The status column of this event's timeline row."""
        return REJECTED_RECORD if self.rejected_record else self.status


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """The merged state of one task, as stored in `tasks`."""

    task_id: str
    status: str
    created_at: datetime
    updated_at: datetime
    tenant: str | None = None
    kind: str | None = None
    stage: str | None = None
    result: Any = None
    verdict: str | None = None
    moderation: Any = None
    trace_id: str | None = None
    error: str | None = None
    callback_url: str | None = None
    completed_at: datetime | None = None
    # When retention deletes the finished task's result and timeline (None: never); from then
    # on every read treats the task as gone (conveyor.retention).
    expires_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        """Whether the task has reached a terminal status."""
        return is_terminal(self.status)

    def expired(self, now: datetime) -> bool:
        """Whether retention has expired the task at `now`."""
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True, slots=True)
class TaskEventRecord:
    """One row of a task's timeline."""

    event_id: str
    task_id: str
    type: str
    status: str
    time: datetime
    stage: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Applied:
    """What `ResultStore.apply_many` did with one update."""

    new: bool  # False: the event id was seen before, so nothing changed
    task: TaskRecord  # the task's row after the update


@dataclass(frozen=True, slots=True)
class Reservation:
    """What `ResultStore.reserve` found: whether this call took the (tenant, task id), the
    task's row, and the digest of the submission that reserved it (None: the task was not
    reserved by a submission, e.g. it came in straight through the ingress topic)."""

    new: bool
    task: TaskRecord
    digest: str | None


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    """The single terminal notification of a task: claimed, then delivered or rejected."""

    task_id: str
    event_id: str
    status: str
    url: str
    claimed_at: datetime
    http_status: int | None = None
    delivered_at: datetime | None = None
    tenant: str | None = None


# Result reuse (conveyor.reuse): what a lookup found for one task's key.
REUSE_HIT = "hit"  # a stored result of an identical task: reuse it
REUSE_WAIT = "wait"  # an identical task holds the key and is running: wait for it
REUSE_RUN = "run"  # the key is this task's now: run the model, then `reuse_finish`


@dataclass(frozen=True, slots=True)
class ReuseClaim:
    """A task asking for a reuse key (conveyor.reuse): keys are per tenant."""

    tenant: str
    key: str
    task_id: str


@dataclass(frozen=True, slots=True)
class ReuseLookup:
    """What `ResultStore.reuse_begin` found: `outcome` is REUSE_HIT (`result` and `model` of
    task `task_id`), REUSE_WAIT (`task_id` holds the key) or REUSE_RUN (this task holds it)."""

    outcome: str
    task_id: str
    result: Any = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class ReuseEntry:
    """A model result to keep for identical tasks until `expires_at`."""

    claim: ReuseClaim
    model: str
    result: Any  # JSON-serialisable
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one retention sweep removed."""

    events: int = 0  # timeline rows of expired tasks
    purged: int = 0  # expired tasks whose result, moderation, error and callback were cleared
    deleted: int = 0  # tombstones past their own horizon: task and notification rows
    reuse: int = 0  # expired reuse entries and stale claims


def _fill(current: Any, new: Any, *, wins: bool) -> Any:
    # None never erases; a winning update overwrites, a losing one only fills gaps.
    if new is None:
        return current
    return new if wins or current is None else current


# Fields that follow the winning event only, fields any event may fill while NULL, and fields
# fixed by the first event that names them.
_OUTCOME_FIELDS = ("stage", "result", "verdict", "moderation", "error")
_GAP_FIELDS = ("trace_id",)
_IDENTITY_FIELDS = ("tenant", "kind", "callback_url")


def merge_task(current: TaskRecord | None, update: TaskUpdate) -> TaskRecord:
    """Fold `update` into the stored row `current` (None: first event) following the precedence."""
    if current is None:
        current = TaskRecord(update.task_id, update.status, update.time, update.time)
        wins = True
    elif update.rejected_record:
        return current  # untrustworthy attribution: a timeline note, nothing else
    else:
        wins = status_wins(
            current.status,
            current.updated_at,
            update.status,
            update.time,
            override=update.override is not None,
        )
    status = update.status if wins else current.status
    fields: dict[str, Any] = {
        name: _fill(getattr(current, name), getattr(update, name), wins=True)
        if wins
        else getattr(current, name)
        for name in _OUTCOME_FIELDS
    }
    for name in _GAP_FIELDS:
        fields[name] = _fill(getattr(current, name), getattr(update, name), wins=wins)
    for name in _IDENTITY_FIELDS:  # set once: a later event can never move a task to a tenant
        fields[name] = _fill(getattr(current, name), getattr(update, name), wins=False)
    if status == TaskStatus.BLOCKED:
        fields["result"] = None  # moderation withheld it; never keep an earlier copy
    completed_at, expires_at = current.completed_at, current.expires_at
    if wins and is_terminal(update.status):
        completed_at = update.time
        expires_at = _expiry(update)
    return dataclasses.replace(
        current,
        status=status,
        created_at=min(current.created_at, update.time),
        updated_at=update.time if wins else current.updated_at,
        completed_at=completed_at,
        expires_at=expires_at,
        **fields,
    )


def _expiry(update: TaskUpdate) -> datetime | None:
    # Counted from the event time, like every stored time, so a replay rebuilds the same row.
    if update.retain_s is None:
        return None
    return update.time + timedelta(seconds=update.retain_s)


def dump_json(value: Any) -> str | None:
    """Serialise a result or moderation value for a JSON text column (None stays NULL)."""
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def load_json(text: str | None) -> Any:
    """Inverse of `dump_json`."""
    return None if text is None else json.loads(text)


# Column orders shared by both backends' SELECTs and the row converters below.
TASK_COLUMNS = (
    "task_id",
    "status",
    "created_at",
    "updated_at",
    "tenant",
    "kind",
    "stage",
    "result",
    "verdict",
    "moderation",
    "trace_id",
    "error",
    "callback_url",
    "completed_at",
    "expires_at",
)
# Columns added to `tasks` after the per-tenant layout: an older file or database gains them at
# open (`ALTER TABLE ... ADD COLUMN`), and the migration from the global-id layout leaves them NULL.
ADDED_TASK_COLUMNS = ("expires_at",)
_TIMES = ("created_at", "updated_at", "completed_at", "expires_at")
EVENT_COLUMNS = ("event_id", "task_id", "type", "status", "time", "stage", "detail")
NOTIFICATION_COLUMNS = (
    "task_id",
    "event_id",
    "status",
    "url",
    "claimed_at",
    "http_status",
    "delivered_at",
    "tenant",
)


def task_from_row(row: Sequence[Any], to_time: Callable[[Any], datetime | None]) -> TaskRecord:
    """Build a `TaskRecord` from a row in `TASK_COLUMNS` order; `to_time` decodes timestamps."""
    values = dict(zip(TASK_COLUMNS, row, strict=True))
    for name in _TIMES:
        values[name] = to_time(values[name])
    values["result"] = load_json(values["result"])
    values["moderation"] = load_json(values["moderation"])
    values["tenant"] = values["tenant"] or None  # the key "" is "no tenant"
    return TaskRecord(**values)


def task_params(task: TaskRecord, from_time: Callable[[datetime | None], Any]) -> tuple[Any, ...]:
    """Inverse of `task_from_row`: parameters in `TASK_COLUMNS` order."""
    values = [getattr(task, name) for name in TASK_COLUMNS]
    for i, name in enumerate(TASK_COLUMNS):
        if name in _TIMES:
            values[i] = from_time(values[i])
        elif name in ("result", "moderation"):
            values[i] = dump_json(values[i])
        elif name == "tenant":
            values[i] = tenant_key(values[i])
    return tuple(values)


def utcnow() -> datetime:
    """Wall-clock now in UTC (only for notification bookkeeping; task times are event times)."""
    return datetime.now(UTC)


class ResultStore(Protocol):
    """Where writeback records task state and notify records its one notification per task.

    Every method is one transaction. Transient database faults (connection lost, database
    locked) raise `conveyor.errors.RetryableError`.
    """

    def apply(self, update: TaskUpdate) -> bool:
        """Record the event and merge it into the task; False if the event id was seen before."""
        ...

    def apply_many(self, updates: Sequence[TaskUpdate]) -> list[Applied]:
        """`apply` for a batch in one transaction (one commit/fsync per batch), with each
        update's task row as it stands after the update (also for a duplicate)."""
        ...

    def get(self, task_id: str, *, tenant: str | None = None) -> TaskRecord | None:
        """That tenant's task, or None; without `tenant`, the one task of that id whatever its
        tenant (`AmbiguousTaskError` when several tenants have one)."""
        ...

    def timeline(self, task_id: str, *, tenant: str | None = None) -> list[TaskEventRecord]:
        """The task's events ordered by event time (ties: arrival order); the tenant as in
        `get`."""
        ...

    def reserve(
        self,
        task_id: str,
        tenant: str,
        *,
        time: datetime,
        digest: str,
        kind: str | None = None,
        callback_url: str | None = None,
    ) -> Reservation:
        """Insert a `pending` row for (tenant, task id) unless one exists, atomically (also
        between processes and hosts); `new` says whether this call inserted it."""
        ...

    def release(self, task_id: str, tenant: str, digest: str) -> bool:
        """Drop a reservation whose task was never published (no event recorded for it, still
        the submission with `digest`), so the caller may submit again; False if none."""
        ...

    def count_by_status(self) -> dict[str, int]:
        """Number of tasks per status; every status is present, zeros included."""
        ...

    def claim_notification(
        self,
        task_id: str,
        event_id: str,
        url: str,
        *,
        tenant: str | None = None,
        lease_s: float | None = None,
    ) -> bool:
        """Claim the task's notification: True only for the first claim.

        With `lease_s`, an unfinished claim older than that may be taken over (its holder is
        presumed dead: at-least-once delivery instead of a notification lost to a crash).
        """
        ...

    def complete_notification(
        self, task_id: str, http_status: int, *, tenant: str | None = None
    ) -> bool:
        """Mark the claimed notification as answered; False if there was no claim."""
        ...

    def release_notification(self, task_id: str, *, tenant: str | None = None) -> bool:
        """Drop an unfinished claim so a retry can claim again; False if there was none."""
        ...

    def notification(self, task_id: str, *, tenant: str | None = None) -> NotificationRecord | None:
        """The task's notification claim, or None if it was never claimed (or was released)."""
        ...

    def list_notifications(self, *, limit: int = 1000) -> list[NotificationRecord]:
        """Notification claims, oldest first."""
        ...

    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""
        ...

    def count_unfinished(self, tenant: str) -> int:
        """The tenant's tasks in a status that is not terminal (pending, processing,
        retrying): the gateway's in-flight quota, the same on every replica."""
        ...

    def expired_at(self, task_id: str, *, tenant: str | None = None) -> datetime | None:
        """When retention expired the task, if it has (`get` and `timeline` then treat it as
        gone); None for a live or unknown task."""
        ...

    def sweep_expired(
        self, *, now: datetime, tombstone_s: float | None, limit: int = 1000
    ) -> SweepReport:
        """Delete the timelines and clear the results of tasks expired at `now`; delete their
        rows (tombstones) `tombstone_s` after expiry (None: keep them); delete expired reuse
        entries. Chunks of `limit` rows, each its own transaction."""
        ...

    def reuse_begin(self, claims: Sequence[ReuseClaim], *, lease_s: float) -> list[ReuseLookup]:
        """For each claim, in one transaction: a live stored result of its key (hit), a live
        claim of another task (wait), or the key claimed for `lease_s` by this task (run)."""
        ...

    def reuse_finish(self, entries: Sequence[ReuseEntry], released: Sequence[ReuseClaim]) -> None:
        """Store the results of keys that ran and drop the claims of those that failed."""
        ...

    def record_variant_runs(self, runs: Sequence[VariantRun]) -> None:
        """Merge what events say about model variants' runs (`conveyor.store.variantruns`)."""
        ...

    def variant_runs(self, *, kind: str | None = None) -> list[VariantRun]:
        """Every variant run recorded (of `kind`): what `conveyor variants report` reads."""
        ...
