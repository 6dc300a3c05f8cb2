"""`Canceller`: what `DELETE /v1/tasks/{id}` and `conveyor cancel` do.

1. Read the tenant's task: none (unknown, or another tenant's) answers None (404).
2. A task already finished otherwise (completed, blocked, failed, expired) is left alone: the
   answer says `cancelled: false` and its status.
3. Record the cancel in the result store as a `cancelled` update. The store's precedence rule
   decides a race with the pipeline atomically: whichever terminal status is recorded first
   stays, so a task that completed a moment earlier answers as in 2.
4. Publish, and wait for the broker's acknowledgement of, the cancel record (compacted cancel
   topic: every stage skips the task from now on) and the `cancelled` status event (writeback
   turns it into the `stored` event that notify sends as the task's one webhook). The status
   event has the id of the store update, so writeback records it once.
5. Answer `cancelled: true`. Only now is the cancel accepted: a caller that got no answer (a
   crash between 3 and 4) repeats the call, and a repeat republishes both records (same key,
   same event id: nothing is duplicated), so the repeat answers the same.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from conveyor.cancel.topic import CANCEL_TOPIC, cancel_key, cancel_note
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import STATUS_TOPIC, STATUS_TYPE, load_catalog
from conveyor.events.codec import encode_binary
from conveyor.events.model import AVRO, TENANT, Event, event_id
from conveyor.kafka.config import common
from conveyor.kafka.producer import Acks, KafkaProducer
from conveyor.settings import KafkaSettings
from conveyor.store import ResultStore, TaskRecord, TaskStatus, TaskUpdate, is_terminal

# The discriminator of the cancel's status event id: one cancel per task.
_DISCRIMINATOR = "cancelled"


@dataclass(frozen=True, slots=True)
class CancelAnswer:
    """What a cancel did: `cancelled` says whether the task is (now or already) cancelled;
    otherwise `status` is the terminal status it reached first."""

    task: TaskRecord

    @property
    def cancelled(self) -> bool:
        return self.task.status == TaskStatus.CANCELLED

    def view(self) -> dict[str, Any]:
        """The answer as JSON (gateway body, `conveyor cancel --json`)."""
        task = self.task
        done = task.completed_at.astimezone(UTC).isoformat() if task.completed_at else None
        return {
            "task_id": task.task_id,
            "tenant": task.tenant,
            "cancelled": self.cancelled,
            "status": task.status,
            "cancelled_at": done if self.cancelled else None,
            "completed_at": done,
        }


def cancel_event_id(task_id: str, tenant: str) -> str:
    """The id of a task's cancel (store update and status event alike)."""
    return event_id(task_id, STATUS_TYPE, _DISCRIMINATOR, tenant=tenant)


class Canceller:
    """Cancels tasks for one front end (`by`: "gateway", "cli"). Thread-safe."""

    def __init__(
        self,
        settings: KafkaSettings,
        store: ResultStore,
        *,
        by: str,
        producer: KafkaProducer | None = None,
        ack_timeout_s: float = 10.0,
    ) -> None:
        self.store = store
        self.by = by
        self.ack_timeout_s = ack_timeout_s
        self.cancel_topic = settings.topic(CANCEL_TOPIC)
        self.status_topic = settings.topic(STATUS_TOPIC)
        spec = load_catalog().spec(STATUS_TYPE)
        assert spec is not None
        self._dataschema = spec.dataschema
        self._schemas = default_schemas()
        # acks=all + idempotence: an acknowledged cancel is on every in-sync replica.
        self.producer = producer or KafkaProducer.open(
            {**common(settings), "enable.idempotence": True, "acks": "all", "linger.ms": 0},
            delivery_timeout_s=ack_timeout_s,
        )
        # One cancel publishes and waits at a time: a group's delivery reports are counted by
        # whichever thread polls, which must be the one waiting for them.
        self._lock = threading.Lock()

    def cancel(self, task_id: str, tenant: str) -> CancelAnswer | None:
        """Cancel the tenant's task (module docstring); None: the tenant has no such task.
        Raises `RetryableError` (store) or `BrokerError` (broker): nothing was accepted."""
        task = self.store.get(task_id, tenant=tenant)
        if task is None:
            return None
        if is_terminal(task.status) and task.status != TaskStatus.CANCELLED:
            return CancelAnswer(task)
        now = datetime.now(UTC)
        update = TaskUpdate(
            task_id=task_id,
            event_id=cancel_event_id(task_id, tenant),
            event_type=STATUS_TYPE,
            status=TaskStatus.CANCELLED,
            time=now,
            stage=self.by,
            tenant=tenant,
            detail=f"cancelled by the tenant ({self.by})",
        )
        row = self.store.apply_many([update])[0].task
        if row.status != TaskStatus.CANCELLED:
            return CancelAnswer(row)  # it finished first
        self._publish(row, tenant)
        return CancelAnswer(row)

    def close(self) -> None:
        self.producer.flush(self.ack_timeout_s)

    def _publish(self, row: TaskRecord, tenant: str) -> None:
        at = row.completed_at or row.updated_at
        key = cancel_key(tenant, row.task_id)
        note = cancel_note(row.task_id, tenant, at=at, by=self.by)
        headers, value = encode_binary(self._status_event(row, tenant, at), self._schemas)
        with self._lock:
            acks = Acks()
            self.producer.send(self.cancel_topic, note, key, acks=acks)
            raw = cast(Any, headers)  # the stubs want str | bytes | None header values
            self.producer.send(self.status_topic, value, row.task_id.encode(), raw, acks=acks)
            self.producer.wait(acks, self.ack_timeout_s)

    def _status_event(self, row: TaskRecord, tenant: str, at: datetime) -> Event:
        data = {
            "task_id": row.task_id,
            "tenant": tenant,
            "status": TaskStatus.CANCELLED.value,
            "stage": self.by,
            "reason": f"cancelled by the tenant ({self.by})",
            "error_class": None,
            "attempt": 0,
            "callback_url": row.callback_url,
            "kind": row.kind,
            "time": at.isoformat(),
            "rejected_record": False,
        }
        return Event(
            id=cancel_event_id(row.task_id, tenant),
            type=STATUS_TYPE,
            source=f"/conveyor/{self.by}",
            subject=row.task_id,
            data=data,
            datacontenttype=AVRO,
            dataschema=self._dataschema,
            time=at.isoformat(),
            extensions={TENANT: tenant},
        )
