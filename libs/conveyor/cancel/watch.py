"""`CancelWatch`: the cancelled tasks as a stage replica knows them, from the cancel topic.

A thread reads the whole cancel topic from its beginning (no consumer group: every replica needs
every cancel) into a set of `cancel_key`s and follows it; a tombstone removes a key. A stage
asks `contains` per record, an in-memory lookup, so skipping costs nothing measurable on the hot
path. `sync()` is the strong form: it reads the topic's high watermark and waits until the
thread has read up to it, so every cancel the broker acknowledged before the call is in the set
after it; inference calls it before each model run (the gateway answers a cancel only after the
broker acknowledged it), so a restarted inference replica runs no model for a task cancelled
while it was down. `start(wait_s=...)` can wait until the topic is read to its end; the stage
runner does not wait (the thread catches up within a fetch or two). A missing topic (a deployment
that has not applied topics since cancellation existed) reads as empty and is looked for again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import Counter

from conveyor.cancel.topic import CANCEL_TOPIC, cancel_key
from conveyor.events.catalog import INGRESS_TYPE
from conveyor.events.model import TENANT, Event
from conveyor.kafka.config import common
from conveyor.settings import KafkaSettings

log = logging.getLogger(__name__)

# The events that carry a task's work; a cancelled task's are skipped. Status and stored
# events carry its outcome (the `cancelled` one among them) and always pass.
WORK_TYPES = frozenset(
    {
        INGRESS_TYPE,
        "conveyor.task.preprocessed.v1",
        "conveyor.task.inferred.v1",
        "conveyor.task.moderated.v1",
    }
)
SKIPPED = Counter(
    "conveyor_cancelled_skipped", "Records of cancelled tasks a stage skipped", ["stage"]
)
# 100 ms: a new cancel reaches a following replica within about one fetch; also the stop delay.
_POLL_S = 0.1
# Metadata and watermark requests: a healthy cluster answers in milliseconds.
_META_TIMEOUT_S = 5.0
# A missing cancel topic is looked for again this often.
_MISSING_RETRY_S = 5.0
# A transient watermark error (leader moving) is asked again after this.
_RETRY_S = 0.1
_TRANSIENT = frozenset(
    (
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
    )
)

ConsumerFactory = Callable[[dict[str, Any]], Any]


def task_of(event: Event) -> tuple[str, str] | None:
    """(tenant, task id) of a task event: the data's id first (the task's identity, as routing
    has it), else the subject; the tenant extension, else the data's."""
    head = event.head  # task id and tenant, without decoding the rest of the data
    data = head if isinstance(head, Mapping) else {}
    task = data.get("task")
    fields = task if isinstance(task, Mapping) else data
    task_id = fields.get("task_id") or event.subject
    if not isinstance(task_id, str) or not task_id:
        return None
    tenant = event.ext(TENANT) or fields.get("tenant") or ""
    return (tenant if isinstance(tenant, str) else ""), task_id


class CancelWatch:
    """Thread-safe: the reading thread adds keys, any thread asks."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        name: str,
        consumer_factory: ConsumerFactory = Consumer,
        sync_timeout_s: float = 5.0,
    ) -> None:
        self.topic = settings.topic(CANCEL_TOPIC)
        self.name = name
        self.sync_timeout_s = sync_timeout_s
        self._conf = {
            **common(settings),
            # Required by the client; never joined (partitions are assigned), never committed.
            "group.id": f"{settings.topic_prefix}conveyor.cancel-watch.{uuid.uuid4().hex[:8]}",
            "client.id": f"conveyor-cancel-watch-{name}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": int(_POLL_S * 1000),
        }
        self._factory = consumer_factory
        self._keys: set[bytes] = set()
        self._seen: dict[bytes, float] = {}  # key -> monotonic time it became visible here
        self._read_to: dict[int, int] = {}  # partition -> next offset to read
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="cancel-watch", daemon=True)
        self._probe: Any = None
        self._probe_lock = threading.Lock()
        self._parts: list[int] = []  # the topic's partitions, once seen (one metadata request)

    # -- asking ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._keys)

    def contains(self, tenant: str | None, task_id: str) -> bool:
        return bool(self._keys) and cancel_key(tenant, task_id) in self._keys

    def visible_at(self, tenant: str | None, task_id: str) -> float | None:
        """When (monotonic) this replica learnt of the task's cancel; None if it has not."""
        return self._seen.get(cancel_key(tenant, task_id))

    def skips(self, event: Event) -> bool:
        """Whether a stage skips `event`: a work event of a cancelled task."""
        if not self._keys or event.type not in WORK_TYPES:
            return False
        task = task_of(event)
        if task is None or cancel_key(*task) not in self._keys:
            return False
        SKIPPED.labels(self.name).inc()
        return True

    def sync(self, timeout_s: float | None = None) -> bool:
        """Wait until every cancel the broker acknowledged before this call is read; False
        when that did not happen within the timeout (the set is then only as fresh as it is)."""
        timeout = self.sync_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                highs = self._highs()
                break
            except KafkaException as exc:
                # Right after the topic is created, or during a leader change, the broker
                # answers NOT_LEADER / LEADER_NOT_AVAILABLE for a moment: ask again.
                if time.monotonic() + _RETRY_S > deadline or not _transient(exc):
                    log.warning(
                        "cancel topic watermarks unavailable topic=%s error=%s", self.topic, exc
                    )
                    return False
                time.sleep(_RETRY_S)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._caught_up(highs), max(0.0, deadline - time.monotonic())
            )

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, *, wait_s: float = 0.0) -> bool:
        """Start following; with `wait_s`, True once the topic is read to its end within it
        (without, at once: False, the thread reads on)."""
        self._probe = self._factory(dict(self._conf, **{"client.id": f"{self.name}-probe"}))
        self._thread.start()
        caught_up = self.sync(wait_s) if wait_s > 0 else False
        log.info(
            "cancel watch started stage=%s topic=%s cancelled=%d caught_up=%s",
            self.name,
            self.topic,
            len(self._keys),
            caught_up,
        )
        return caught_up

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        if self._probe is not None:
            with self._probe_lock:
                self._probe.close()
            self._probe = None

    # -- reading -----------------------------------------------------------------------------

    def _caught_up(self, highs: dict[int, int]) -> bool:
        return all(self._read_to.get(p, 0) >= high for p, high in highs.items())

    def _highs(self) -> dict[int, int]:
        """The high watermark of each partition; empty when the topic does not exist."""
        with self._probe_lock:
            if self._probe is None:
                return {}
            parts = self._parts = self._parts or _partitions(self._probe, self.topic)
            return {
                p: int(
                    self._probe.get_watermark_offsets(
                        TopicPartition(self.topic, p), timeout=_META_TIMEOUT_S, cached=False
                    )[1]
                )
                for p in parts
            }

    def _follow(self) -> None:
        consumer = self._factory(self._conf)
        assigned = False
        try:
            while not self._stop.is_set():
                if not assigned:
                    assigned = self._assign(consumer)
                    if not assigned:
                        self._stop.wait(_MISSING_RETRY_S)
                    continue
                assigned = self.apply(consumer.consume(500, _POLL_S))
        except Exception:  # never raises into the stage: the set stays as it is, logged
            log.exception("cancel watch stopped following topic=%s", self.topic)
        finally:
            consumer.close()

    def _assign(self, consumer: Any) -> bool:
        try:
            parts = _partitions(consumer, self.topic)
        except KafkaException as exc:
            log.warning("cancel topic unavailable topic=%s error=%s", self.topic, exc)
            return False
        if not parts:
            log.warning("cancel topic missing topic=%s (run topics apply)", self.topic)
            return False
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        return True

    def apply(self, messages: list[Any]) -> bool:
        """Take a consumed batch into the set; False when the topic went away (re-assign)."""
        present = True
        with self._cond:
            for msg in messages:
                err = msg.error()
                if err is None:
                    self._record(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    part = int(msg.partition() or 0)
                    self._read_to[part] = max(self._read_to.get(part, 0), int(msg.offset() or 0))
                elif err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    present = False
                else:
                    log.warning("cancel topic read error topic=%s error=%s", self.topic, err)
            self._cond.notify_all()
        return present

    def _record(self, msg: Any) -> None:
        key = msg.key()
        if key:
            if msg.value() is None:  # a tombstone: the cancel is withdrawn
                self._keys.discard(key)
                self._seen.pop(key, None)
            elif key not in self._keys:
                self._keys.add(key)
                self._seen[key] = time.monotonic()
        self._read_to[int(msg.partition() or 0)] = int(msg.offset() or 0) + 1


def _transient(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    if not isinstance(error, KafkaError):
        return False
    return bool(error.retriable()) or error.code() in _TRANSIENT


def _partitions(consumer: Any, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=_META_TIMEOUT_S).topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)
