"""Admission control: when will a new task start, and will its deadline pass before that?

The estimate is *records ahead / recent service rate*:

- **ahead** of a task in lane L: the ingress backlog (records the preprocess group has not
  committed) plus the inference group's backlog on lane L and every higher lane (inference serves
  higher lanes first);
- **service rate**: how fast the inference group's committed offsets moved over all lanes in the
  last `window_s` (the model's recent throughput: it drains the lanes ahead too).

A snapshot of both is read from Kafka at most every `ttl_s` (committed offsets and high
watermarks through a consumer that never joins the groups: every gateway replica sees the same
figures). While the rate is unknown (fewer than two snapshots, or nothing served in the window)
the wait is unknown and the task is admitted: refusing on no evidence would turn a stage start
into an outage. A task with a deadline is refused when `now + wait` passes it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import Gauge

from conveyor.errors import BrokerError
from conveyor.events.catalog import LANES

log = logging.getLogger(__name__)
INGRESS = "ingress"
LANE_ESTIMATED_WAIT = Gauge(
    "conveyor_lane_estimated_wait_seconds",
    "Admission control's estimate of a new task's queue wait per lane (NaN: unknown)",
    ["lane"],
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # monotonic seconds
    waiting: dict[str, int]  # lane (or INGRESS) -> records not yet committed by its group
    served: int  # the inference group's committed offsets, summed over every lane


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    ahead: int | None  # records ahead of the task; None: unknown
    wait_s: float | None  # estimated queue wait; None: unknown
    start: datetime | None  # estimated start; None: unknown


def ahead_of(snapshot: Snapshot, lane: str) -> int:
    index = LANES.index(lane) if lane in LANES else LANES.index("normal")
    return snapshot.waiting.get(INGRESS, 0) + sum(
        snapshot.waiting.get(name, 0) for name in LANES[: index + 1]
    )


def service_rate(history: Sequence[Snapshot]) -> float | None:
    """Records served per second between the oldest and newest snapshot; None if unknown."""
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    elapsed, served = last.at - first.at, last.served - first.served
    if elapsed <= 0 or served <= 0:
        return None
    return served / elapsed


def decide(ahead: int, rate: float | None, deadline: datetime | None, now: datetime) -> Verdict:
    if ahead == 0:
        wait: float | None = 0.0
    elif rate is None:
        wait = None
    else:
        wait = ahead / rate
    start = now + timedelta(seconds=wait) if wait is not None else None
    allowed = deadline is None or start is None or start <= deadline
    return Verdict(allowed, ahead, wait, start)


class Admission:
    """Estimates from a cached snapshot history; thread-safe; one probe per `ttl_s`."""

    def __init__(
        self,
        probe: Callable[[], Snapshot],
        *,
        ttl_s: float = 5.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe = probe
        self.ttl_s = ttl_s
        self.window_s = window_s
        self.clock = clock
        self.history: deque[Snapshot] = deque()
        self._expires = float("-inf")
        self._lock = threading.Lock()

    def check(self, lane: str, deadline: datetime | None, now: datetime) -> Verdict:
        self._refresh()
        history = list(self.history)
        if not history:
            return Verdict(True, None, None, None)
        return decide(ahead_of(history[-1], lane), service_rate(history), deadline, now)

    def _refresh(self) -> None:
        if self.clock() < self._expires or not self._lock.acquire(blocking=False):
            return
        try:
            self._expires = self.clock() + self.ttl_s
            try:
                snapshot = self.probe()
            except BrokerError as exc:
                log.warning("admission estimate unavailable error=%s", exc)
                return
            self.history.append(snapshot)
            while len(self.history) > 2 and snapshot.at - self.history[0].at > self.window_s:
                self.history.popleft()
            rate = service_rate(list(self.history))
            for lane in LANES:
                ahead = ahead_of(snapshot, lane)
                wait = 0.0 if ahead == 0 else (ahead / rate if rate else math.nan)
                LANE_ESTIMATED_WAIT.labels(lane=lane).set(wait)
        finally:
            self._lock.release()


def retry_after(verdict: Verdict) -> str:
    """Retry-After for a refused task: once the records ahead of it would be served."""
    return str(max(1, math.ceil(verdict.wait_s or 1.0)))


class KafkaBacklog:
    """The probe: the preprocess group's backlog on the ingress topic, the inference group's
    backlog per lane topic and its committed total, from committed offsets and watermarks."""

    def __init__(
        self,
        conf: dict[str, Any],
        *,
        ingress: tuple[str, str],  # (group, topic)
        inference_group: str,
        lanes: dict[str, str],  # lane -> topic
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ingress = ingress
        self.inference_group = inference_group
        self.lanes = lanes
        self.timeout_s = timeout_s
        self.clock = clock
        base = {**conf, "enable.auto.commit": False, "client.id": "conveyor-admission-probe"}
        self._ingress = Consumer({**base, "group.id": ingress[0]})
        self._inference = Consumer({**base, "group.id": inference_group})

    def __call__(self) -> Snapshot:
        try:
            ingress_lag, _ = self._read(self._ingress, [self.ingress[1]])
            waiting = {INGRESS: ingress_lag}
            served = 0
            for lane, topic in self.lanes.items():
                waiting[lane], committed = self._read(self._inference, [topic])
                served += committed
            return Snapshot(self.clock(), waiting, served)
        except KafkaException as exc:
            raise BrokerError(f"backlog unavailable: {exc}") from exc

    def _read(self, consumer: Consumer, topics: list[str]) -> tuple[int, int]:
        """(lag, committed total) of the consumer's group on these topics."""
        parts = []
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
            if meta is None or meta.error is not None:
                raise BrokerError(f"topic {topic} unavailable")
            parts += [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        lag = committed_total = 0
        for tp in consumer.committed(parts, timeout=self.timeout_s):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=self.timeout_s, cached=False
            )
            start = tp.offset if tp.offset >= 0 else low
            lag += max(high - start, 0)
            committed_total += max(start, 0)
        return lag, committed_total

    def close(self) -> None:
        self._ingress.close()
        self._inference.close()
