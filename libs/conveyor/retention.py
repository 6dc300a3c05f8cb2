"""Retention: how long a finished task's result and timeline are kept, per tenant, and the sweep.

Writeback stamps each task with `expires_at` = the time of its terminal event + the tenant's
retention (`CONVEYOR_TENANT_RETENTION_S`, else `CONVEYOR_RETENTION_S`; 0 keeps it for ever), so
the row itself says when it goes and readers need no configuration. From `expires_at` on, every
read treats the task as gone (`get` None, `timeline` empty, the gateway 404 with the reason). The
sweep (writeback's background thread every `retention_sweep_s`, or `conveyor retention sweep`)
deletes the timelines, clears results, moderation, errors and callback URLs, and keeps a small
tombstone (id, tenant, status, times) for `retention_tombstone_s` more, so the id stays taken
and a reader learns why the task is gone; then the row and its notification record go too.
Details and reasons: docs/reuse.md.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from pydantic import Field

from conveyor.settings import StoreSettings
from conveyor.store import ResultStore, SweepReport, open_store

log = logging.getLogger(__name__)

DAY_S = 86_400.0


class RetentionSettings(StoreSettings):
    """Retention of finished tasks (`CONVEYOR_*`); read by writeback and the CLI."""

    retention_s: float = Field(
        default=30 * DAY_S,
        ge=0,
        description="seconds a finished task's result and timeline are kept; 0: for ever",
    )
    tenant_retention_s: dict[str, float] = Field(
        default_factory=dict,
        description="per-tenant retention in seconds, JSON object (0: for ever); others take "
        "retention_s",
    )
    retention_tombstone_s: float = Field(
        default=30 * DAY_S,
        ge=0,
        description="seconds an expired task's tombstone (id, status, times) is kept so reads "
        "say why it is gone and the id stays taken; then the row is deleted",
    )
    retention_sweep_s: float = Field(
        default=3600.0,
        ge=0,
        description="writeback sweeps expired tasks this often; 0: never (run `conveyor "
        "retention sweep` from cron instead)",
    )
    retention_sweep_chunk: int = Field(
        default=1000, ge=1, description="rows deleted per sweep transaction"
    )

    def retain_s(self, tenant: str | None) -> float | None:
        """Seconds the tenant's finished tasks are kept; None: for ever."""
        seconds = self.tenant_retention_s.get(tenant or "", self.retention_s)
        return seconds if seconds > 0 else None


def sweep(store: ResultStore, settings: RetentionSettings) -> SweepReport:
    """One sweep of everything expired now."""
    report = store.sweep_expired(
        now=datetime.now(UTC),
        tombstone_s=settings.retention_tombstone_s,
        limit=settings.retention_sweep_chunk,
    )
    log.info(
        "retention sweep events=%d purged=%d deleted=%d reuse=%d",
        report.events,
        report.purged,
        report.deleted,
        report.reuse,
    )
    return report


class Sweeper:
    """Runs `sweep` every `retention_sweep_s` on a daemon thread with its own store connection,
    so the stage loop never waits for it; a failed sweep is logged and tried at the next tick."""

    def __init__(self, settings: RetentionSettings) -> None:
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention-sweep", daemon=True)
        self.sweeps = 0

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        store: ResultStore | None = None
        interval = self._settings.retention_sweep_s
        try:
            while not self._stop.is_set():
                try:
                    store = store or open_store(self._settings.store_url)
                    sweep(store, self._settings)
                    self.sweeps += 1
                except Exception:  # the database is away for a while: the next tick tries again
                    log.warning("retention sweep failed; next in %.0f s", interval, exc_info=True)
                self._stop.wait(interval)
        finally:
            if store is not None:
                store.close()


def start_sweeper(settings: RetentionSettings) -> Sweeper | None:
    """The background sweeper, or None when `retention_sweep_s` is 0."""
    if settings.retention_sweep_s <= 0:
        return None
    return Sweeper(settings).start()
