"""Fair share across tenants: what a pipelined stage runs next, from a bounded read-ahead window.

Records polled by the stage wait in a window (bounded in records and in bytes: at the bound the
stage pauses its partitions) instead of going to the handler in partition order. Each batch is
taken from the window by:

1. **Priority lane first.** The highest lane with a record waiting is served; a lower lane whose
   oldest waiting record has waited `starvation_s`, and that has not been served for as long, is
   served one batch first instead (the same guard as `conveyor.runtime.lanes`, which decides what
   is *read*; this decides what is *run*). Counting from its last service matters: under a
   sustained backlog a lower lane's oldest record is always older than `starvation_s`, and
   without it the guard would serve that lane every time and starve the higher ones.
2. **Deficit round robin over tenants** within that lane: each tenant with work gets
   `weight` records of credit per visit, in turn, so with equal weights two busy tenants get
   half the batches each however long either one's backlog is. A tenant's own records keep their
   partition order. A tenant whose queue empties leaves the rotation and loses its credit.

Taking records out of order means offsets cannot be committed per batch: `CommitTracker`
(`conveyor.runtime.fairfeed`, with `FairShare`, which feeds the stage's pipeline) keeps
the offsets read but not finished, and a partition is committed up to its lowest unfinished
record (so a crash redelivers at most the window). Records dropped from the window (partition
revoked, stage stopping) stay unfinished: the commit never passes them and the next owner reads
them again.

Pure logic over `Message`-like records (topic, partition, offset, headers, value); no Kafka
client call, no clock read: `now` is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Histogram

TP = tuple[str, int]
TENANT_HEADER = "ce_tenant"
DEADLINE_HEADER = "ce_deadline"
# Records with no tenant header (a bad record: the step dead-letters it) share one queue.
NO_TENANT = ""


def tenant_of(msg: Any) -> str:
    """The record's tenant, from its CloudEvents header (no decoding of the value)."""
    return header_tenant(msg.headers())


def header_tenant(headers: Any) -> str:
    return _header_fields(headers)[0]


def _header_fields(headers: Any) -> tuple[str, str | None]:
    """The tenant and the deadline (RFC 3339, or None) a record's headers name."""
    tenant, deadline = NO_TENANT, None
    for key, value in headers or ():
        if key == TENANT_HEADER:
            tenant = _text(value)
        elif key == DEADLINE_HEADER:
            deadline = _text(value)
    return tenant, deadline


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _before(deadline: str | None, when: datetime) -> bool:
    """Whether the deadline lies before `when` (an unreadable one never does: the handler's
    own check decides what it means)."""
    if not deadline:
        return False
    try:
        parsed = datetime.fromisoformat(deadline)
    except ValueError:
        return False
    return parsed.tzinfo is not None and parsed < when


@dataclass(slots=True)
class _Waiting:
    msg: Any
    since: float  # when it entered the window
    size: int
    deadline: str | None  # its `deadline` header: a held record may not outlive it


@dataclass(slots=True)
class _Lane:
    """One lane's deficit round robin: a queue per tenant, the rotation, each one's credit."""

    queues: dict[str, deque[_Waiting]] = field(default_factory=dict)
    rotation: deque[str] = field(default_factory=deque)
    credit: dict[str, float] = field(default_factory=dict)
    fresh: bool = True  # the tenant at the head of the rotation has not had its quantum yet

    def add(self, tenant: str, waiting: _Waiting) -> None:
        queue = self.queues.get(tenant)
        if queue is None:
            queue = self.queues[tenant] = deque()
            self.rotation.append(tenant)
            self.credit[tenant] = 0.0
        queue.append(waiting)

    def oldest(self) -> float | None:
        return min((q[0].since for q in self.queues.values() if q), default=None)

    def take(
        self,
        n: int,
        weight: Mapping[str, float],
        default_weight: float,
        admit: Callable[[str], bool],
    ) -> list[_Waiting]:
        out: list[_Waiting] = []
        held: set[str] = set()  # tenants over their quota: skipped for the rest of this batch
        while len(out) < n and len(held) < len(self.rotation):
            tenant = self.rotation[0]
            if tenant in held:
                self.rotation.rotate(-1)
                self.fresh = True
                continue
            queue = self.queues[tenant]
            if self.fresh:
                self.credit[tenant] += weight.get(tenant, default_weight)
                self.fresh = False
            while queue and self.credit[tenant] >= 1.0 and len(out) < n:
                if not admit(tenant):
                    held.add(tenant)  # it keeps its records and its credit, loses its turn
                    break
                out.append(queue.popleft())
                self.credit[tenant] -= 1.0
            if not queue:
                self._leave(tenant)
            elif tenant in held or self.credit[tenant] < 1.0:
                self.rotation.rotate(-1)  # its turn is over; credit below one record carries
                self.fresh = True
            # else: the batch is full mid-turn; the tenant keeps its turn and its credit.
        return out

    def late(
        self, wall: datetime, wait: Callable[[str, int], float | None]
    ) -> list[tuple[str, _Waiting]]:
        """Take out the records of held tenants (wait not None) that cannot start before their
        deadline: the `i`-th of a tenant's queue starts `wait(tenant, i)` seconds from now at
        the earliest."""
        out: list[tuple[str, _Waiting]] = []
        for tenant in list(self.queues):
            if wait(tenant, 0) is None:
                continue
            queue, keep = self.queues[tenant], deque[_Waiting]()
            for waiting in queue:
                least = wait(tenant, len(keep)) or 0.0  # its place among those left
                if _before(waiting.deadline, wall + timedelta(seconds=least)):
                    out.append((tenant, waiting))
                else:
                    keep.append(waiting)
            self.queues[tenant] = keep
            if not keep:
                self._leave(tenant)
        return out

    def drop(self, tps: set[TP]) -> list[_Waiting]:
        dropped = []
        for tenant in list(self.queues):
            queue = self.queues[tenant]
            keep = deque(w for w in queue if (w.msg.topic(), w.msg.partition()) not in tps)
            dropped += [w for w in queue if (w.msg.topic(), w.msg.partition()) in tps]
            self.queues[tenant] = keep
            if not keep:
                self._leave(tenant)
        return dropped

    def _leave(self, tenant: str) -> None:
        head = bool(self.rotation) and self.rotation[0] == tenant
        del self.queues[tenant]
        del self.credit[tenant]
        self.rotation.remove(tenant)
        if head:
            self.fresh = True


class FairWindow:
    """The read-ahead window: records waiting to run, served by lane, then tenant."""

    def __init__(
        self,
        lanes: Sequence[str],
        *,
        weights: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
        max_records: int,
        max_bytes: int,
        starvation_s: float,
        admit: Callable[[str], bool] | None = None,
    ) -> None:
        self.lanes = list(lanes)  # priority order, highest first; other topics rank below
        # Quotas: may this tenant start one more record now? (it is then counted as started)
        self.admit = admit or (lambda _tenant: True)
        self.weights = dict(weights or {})
        if default_weight <= 0 or any(w <= 0 for w in self.weights.values()):
            raise ValueError("tenant weights must be positive")
        self.default_weight = default_weight
        # Called per record taken: (tenant, seconds it waited in the window); metrics.
        self.observe: Callable[[str, float], None] | None = None
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.starvation_s = starvation_s
        self._lanes: dict[str, _Lane] = {}
        self.records = 0
        self.bytes = 0
        self.served: dict[str, int] = {}  # tenant -> records taken to run (served share)
        self._served_at: dict[str, float] = {}  # lane -> when a batch was last taken from it

    def __len__(self) -> int:
        return self.records

    @property
    def full(self) -> bool:
        return self.records >= self.max_records or self.bytes >= self.max_bytes

    def add(self, records: Iterable[Any], now: float) -> None:
        for msg in records:
            size = len(msg.value() or b"")
            lane = self._lanes.get(msg.topic())
            if lane is None:
                lane = self._lanes[msg.topic()] = _Lane()
            tenant, deadline = _header_fields(msg.headers())
            lane.add(tenant, _Waiting(msg, now, size, deadline))
            self.records += 1
            self.bytes += size

    def take(self, n: int, now: float) -> list[Any]:
        """The next batch: up to `n` records of one lane (see the module docstring). A lane
        whose waiting tenants are all over their quota is passed over for the next one."""
        taken: list[_Waiting] = []
        for name in self._lane_order(now):
            taken = self._lanes[name].take(n, self.weights, self.default_weight, self.admit)
            if taken:
                self._served_at[name] = now
                break
        for waiting in taken:
            self.records -= 1
            self.bytes -= waiting.size
            tenant = tenant_of(waiting.msg)
            self.served[tenant] = self.served.get(tenant, 0) + 1
            if self.observe is not None:
                self.observe(tenant, now - waiting.since)
        return [waiting.msg for waiting in taken]

    def drop(self, tps: Iterable[TP] | None = None) -> list[Any]:
        """Take the waiting records of these partitions (all with None) out, unrun."""
        dropped: list[_Waiting] = []
        for lane in self._lanes.values():
            if tps is None:
                dropped += [w for q in lane.queues.values() for w in q]
                lane.queues.clear()
                lane.rotation.clear()
                lane.credit.clear()
                lane.fresh = True
            else:
                dropped += lane.drop(set(tps))
        self.records -= len(dropped)
        self.bytes -= sum(w.size for w in dropped)
        return [w.msg for w in dropped]

    def late(
        self, wall: datetime, wait: Callable[[str, int], float | None]
    ) -> list[tuple[str, Any]]:
        """(tenant, record) of every held record that cannot start before its deadline (see
        `_Lane.late`), taken out of the window."""
        late: list[tuple[str, _Waiting]] = []
        for lane in self._lanes.values():
            late += lane.late(wall, wait)
        self.records -= len(late)
        self.bytes -= sum(w.size for _, w in late)
        return [(tenant, w.msg) for tenant, w in late]

    def waits(self, now: float) -> dict[str, float]:
        """Per lane, how long its oldest waiting record has waited (seconds)."""
        out = {}
        for name, lane in self._lanes.items():
            oldest = lane.oldest()
            if oldest is not None:
                out[name] = now - oldest
        return out

    def _lane_order(self, now: float) -> list[str]:
        """Lanes with records, in the order to try: starved lanes (lowest first), then by
        priority."""
        ranked = sorted(
            (name for name, lane in self._lanes.items() if lane.rotation), key=self._rank
        )
        starved = []
        for name in reversed(ranked[1:]):  # the starvation guard: lowest starved lane first
            oldest = self._lanes[name].oldest()
            if oldest is None:
                continue
            waiting_since = max(oldest, self._served_at.get(name, oldest))
            if now - waiting_since >= self.starvation_s:
                starved.append(name)
        return starved + [name for name in ranked if name not in starved]

    def _rank(self, topic: str) -> int:
        try:
            return self.lanes.index(topic)
        except ValueError:
            return len(self.lanes)


class TenantMetrics:
    """Per-tenant series of a fair-share stage: how long its records waited in the window
    (queue wait) and how many it was served (its share: rate over the sum of rates). The
    tenant label is bounded by the tenants that submit; a deployment that lets any string in
    as a tenant should validate it upstream (the gateway's tokens name them)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def observe(self, tenant: str, waited_s: float) -> None:
        TENANT_QUEUE_WAIT.labels(stage=self.stage, tenant=tenant).observe(waited_s)
        TENANT_SERVED.labels(stage=self.stage, tenant=tenant).inc()


TENANT_QUEUE_WAIT = Histogram(
    "conveyor_tenant_queue_wait_seconds",
    "Time a tenant's record waited in the fair-share window before it ran",
    ["stage", "tenant"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TENANT_SERVED = Counter(
    "conveyor_tenant_served_total",
    "Records of a tenant handed to the handler by fair share (served share: its rate / all)",
    ["stage", "tenant"],
)
