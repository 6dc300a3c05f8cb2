"""Per-tenant quotas: a submission rate (token bucket) and tasks in flight.

The rate is a token bucket of `rate` tasks per second holding up to `burst`, computed as GCRA
(generic cell rate algorithm): one number per tenant, the *theoretical arrival time* (TAT), so
the whole bucket state fits one row. `gcra` is the pure rule.

Where the state lives decides who shares it:

- `SqlRateLedger` keeps each tenant's TAT in a table of the result store's database (SQLite
  file or PostgreSQL, through the store's dialect), updated in one transaction per check
  (`BEGIN IMMEDIATE` / `SELECT ... FOR UPDATE`): every gateway replica on that database draws
  from the same bucket. A transient database fault raises `RetryableError` (the gateway: 503).
- `MemoryRateLedger` keeps it in the process (the inference stage's hold of tasks that arrive
  straight on Kafka: each instance paces what it starts; unit tests).

Tasks in flight are counted where each place can see them: the gateway counts a tenant's
unfinished tasks in the store (every replica reads the same rows); the inference stage counts the
tenant's records it has started and not finished (`TenantLimits`).

Limits per tenant come from `QuotaSettings` (`CONVEYOR_QUOTA_*`, `CONVEYOR_TENANT_QUOTAS`).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.errors import PermanentError

TABLE = "conveyor_quota"
QUOTA_REJECTIONS = Counter(
    "conveyor_quota_rejections_total",
    "Tasks refused by a tenant quota: gateway 429s (limit rate or in_flight) and tasks held at "
    "the inference stage until their deadline could no longer be met (limit deadline)",
    ["tenant", "limit"],
)


class QuotaError(PermanentError):
    """A task held over its tenant's quota cannot start before its deadline: it fails (status
    `failed`, dead-lettered, so an operator may redrive it) instead of expiring unexplained."""


class TenantQuota(BaseModel):
    """One tenant's limits; 0 means unlimited."""

    model_config = {"frozen": True}

    rate: float = Field(default=100.0, ge=0, description="tasks per second, sustained")
    burst: int = Field(default=500, ge=1, description="tasks at once above the rate")
    in_flight: int = Field(default=0, ge=0, description="tasks running at once (inference)")


class QuotaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", frozen=True, extra="ignore")

    quota_rate: float = Field(default=100.0, ge=0, description="default tasks/s per tenant; 0: off")
    quota_burst: int = Field(default=500, ge=1, description="default burst per tenant")
    quota_in_flight: int = Field(default=0, ge=0, description="default in flight; 0: unlimited")
    quota_in_flight_retry_s: float = Field(
        default=1.0,
        gt=0,
        description="Retry-After of a gateway 429 over the in-flight limit (when a task of the "
        "tenant's finishes is unknown)",
    )
    tenant_quotas: dict[str, TenantQuota] = Field(
        default_factory=dict,
        description='per-tenant limits, JSON {"tenant": {"rate": 5, "burst": 10, "in_flight": 4}}',
    )

    def of(self, tenant: str) -> TenantQuota:
        found = self.tenant_quotas.get(tenant)
        if found is not None:
            return found
        return TenantQuota(
            rate=self.quota_rate, burst=self.quota_burst, in_flight=self.quota_in_flight
        )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    retry_after_s: float  # when refused: how long until one task fits the rate again


def gcra(tat: float, now: float, rate: float, burst: int) -> tuple[Decision, float]:
    """Check one task against a bucket of `rate`/s holding `burst`; the new TAT to store."""
    if rate <= 0:
        return Decision(True, 0.0), tat
    interval = 1.0 / rate
    new_tat = max(tat, now) + interval
    over = new_tat - now - burst * interval
    if over > 1e-9:
        return Decision(False, over), tat
    return Decision(True, 0.0), new_tat


def gcra_wait(tat: float, now: float, rate: float, burst: int, position: int) -> float:
    """Seconds from `now` until the task `position` places behind the next one fits the rate."""
    if rate <= 0:
        return 0.0
    interval = 1.0 / rate
    return max(0.0, max(tat, now) - now + (position - burst + 1) * interval)


class RateLedger(Protocol):
    def take(self, tenant: str, quota: TenantQuota) -> Decision: ...

    def close(self) -> None: ...


class MemoryRateLedger:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str, quota: TenantQuota) -> Decision:
        with self._lock:
            decision, tat = gcra(self._tat.get(tenant, 0.0), self.clock(), quota.rate, quota.burst)
            self._tat[tenant] = tat
            return decision

    def wait(self, tenant: str, quota: TenantQuota, position: int) -> float:
        """Seconds until the task `position` behind the next one of the tenant fits its rate."""
        with self._lock:
            tat = self._tat.get(tenant, 0.0)
            return gcra_wait(tat, self.clock(), quota.rate, quota.burst, position)

    def close(self) -> None:
        return None


class SqlRateLedger:
    """The TATs in a table of the store's database, shared by every process using it: one
    transaction per check, written once over the store's dialect (`conveyor.store.dialect`),
    whose write transaction (`BEGIN IMMEDIATE`) or row lock (`FOR UPDATE`) keeps two replicas
    from reading the same TAT."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time) -> None:
        from conveyor.store import open_dialect

        self.clock = clock  # wall time: replicas compare their clocks through the table
        self._d = open_dialect(url)  # ValueError for a scheme that is no SQL store
        p = self._d.p
        # The row exists before it is read, so the read can lock it on every dialect.
        self._insert = f"INSERT INTO {TABLE} (tenant, tat) VALUES ({p}, 0) ON CONFLICT DO NOTHING"
        self._select = f"SELECT tat FROM {TABLE} WHERE tenant = {p}{self._d.for_update}"
        self._update = f"UPDATE {TABLE} SET tat = {p} WHERE tenant = {p}"
        with self._d.transaction() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} "
                "(tenant TEXT PRIMARY KEY, tat DOUBLE PRECISION NOT NULL)"
            )

    def take(self, tenant: str, quota: TenantQuota) -> Decision:
        if quota.rate <= 0:
            return Decision(True, 0.0)
        with self._d.transaction() as cur:
            cur.execute(self._insert, (tenant,))
            (tat,) = cur.execute(self._select, (tenant,)).fetchone()
            decision, new_tat = gcra(float(tat), self.clock(), quota.rate, quota.burst)
            if decision.allowed:
                cur.execute(self._update, (new_tat, tenant))
        return decision

    def close(self) -> None:
        self._d.close()


def retry_after_header(decision: Decision | Refusal) -> str:
    """Retry-After in whole seconds (HTTP), at least 1."""
    return str(max(1, math.ceil(decision.retry_after_s)))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the gateway refuses a task for quota: the limit passed, a message, when to retry."""

    limit: str  # "rate" or "in_flight" (the metric's label)
    message: str
    retry_after_s: float


class SubmissionQuota:
    """The gateway's check: a tenant's tasks in flight (unfinished in the store, when
    `unfinished` is given), then its submission rate against the shared ledger. The in-flight
    count is checked first, so a task it refuses does not use up a token; it is a read, not a
    reservation, so replicas answering at the same instant may let the limit be passed by as
    many tasks as they answer at once."""

    def __init__(
        self,
        settings: QuotaSettings,
        ledger: RateLedger,
        *,
        unfinished: Callable[[str], int] | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.unfinished = unfinished  # tenant -> its tasks not yet in a terminal status

    def check(self, tenant: str) -> Refusal | None:
        """None when the task may be accepted, else why not and when to try again."""
        quota = self.settings.of(tenant)
        if quota.in_flight and self.unfinished is not None:
            running = self.unfinished(tenant)
            if running >= quota.in_flight:
                QUOTA_REJECTIONS.labels(tenant=tenant, limit="in_flight").inc()
                message = f"tenant has {running} tasks in flight, its limit is {quota.in_flight}"
                return Refusal("in_flight", message, self.settings.quota_in_flight_retry_s)
        decision = self.ledger.take(tenant, quota)
        if not decision.allowed:
            QUOTA_REJECTIONS.labels(tenant=tenant, limit="rate").inc()
            return Refusal("rate", "tenant over its submission rate", decision.retry_after_s)
        return None

    def close(self) -> None:
        self.ledger.close()


class TenantLimits:
    """The inference stage's hold of tasks that arrived straight on Kafka: may a tenant start
    one more task now? Over its in-flight limit or its rate, its tasks wait in the fair-share
    window (not lost; the window's bound pauses the partitions) until it is under quota again.

    At the stage, the rate applies only to tenants named in `tenant_quotas` (the default rate
    is the gateway's front door: applied per inference instance it would multiply by the
    replicas and cap every tenant's GPU share); the default in-flight limit applies to all.
    """

    def __init__(self, settings: QuotaSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.ledger = MemoryRateLedger(clock)
        self.running: dict[str, int] = {}

    def admit(self, tenant: str) -> bool:
        quota = self.settings.of(tenant)
        running = self.running.get(tenant, 0)
        if quota.in_flight and running >= quota.in_flight:
            return False
        if tenant in self.settings.tenant_quotas and not self.ledger.take(tenant, quota).allowed:
            return False
        self.running[tenant] = running + 1
        return True

    def wait(self, tenant: str, position: int) -> float | None:
        """None when the tenant may start a task now; else the least seconds until its task
        `position` places behind the next could start (0 when only its in-flight limit holds
        it: when a running task finishes is not known)."""
        quota = self.settings.of(tenant)
        limited = tenant in self.settings.tenant_quotas and quota.rate > 0
        full = bool(quota.in_flight) and self.running.get(tenant, 0) >= quota.in_flight
        if not full and (not limited or self.ledger.wait(tenant, quota, 0) <= 0):
            return None  # nothing holds it: it may start now
        return self.ledger.wait(tenant, quota, position) if limited else 0.0

    def finished(self, tenant: str) -> None:
        left = self.running.get(tenant, 0) - 1
        if left > 0:
            self.running[tenant] = left
        else:
            self.running.pop(tenant, None)
