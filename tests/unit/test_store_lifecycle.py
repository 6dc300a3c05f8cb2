"""Retention and result reuse in the result store: the contract every backend keeps.

`LifecycleContract` is written once and runs here on SQLite (in memory and on a file) and in
tests/integration/test_store_lifecycle_postgres.py on the throwaway PostgreSQL. Times are relative
to the wall clock, since reads compare `expires_at` with now.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.store import ResultStore, ReuseClaim, ReuseEntry, TaskUpdate, open_store

# Reset before each test (`LifecycleContract._now`): the stores compare expiry with the real
# clock, so a time taken at import would be minutes old when the full suite reaches these tests.
NOW = datetime.now(UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def update(task_id: str, event: str, status: str, when: datetime, **fields: Any) -> TaskUpdate:
    fields.setdefault("tenant", "acme")
    event_id = f"{fields['tenant']}-{task_id}-{event}"  # event ids include the tenant
    return TaskUpdate(task_id, event_id, f"conveyor.task.{event}.v1", status, when, **fields)


def finished(
    store: ResultStore, task_id: str, when: datetime, retain_s: float | None, **fields: Any
) -> None:
    store.apply(update(task_id, "pre", "processing", when - timedelta(seconds=1), **fields))
    store.apply(
        update(
            task_id,
            "mod",
            "completed",
            when,
            result={"model": "m", "text": "secret"},
            verdict="allow",
            moderation={"scores": {}},
            callback_url="https://example.com/hook",
            retain_s=retain_s,
            **fields,
        )
    )


class LifecycleContract:
    @pytest.fixture(autouse=True)
    def _now(self) -> None:
        global NOW
        NOW = datetime.now(UTC)

    @pytest.fixture
    def store(self, store_url: str) -> Iterator[ResultStore]:
        opened = open_store(store_url)
        yield opened
        opened.close()

    # --- retention ------------------------------------------------------------------------

    def test_terminal_event_stamps_expiry_from_its_time(self, store: ResultStore) -> None:
        finished(store, "live", ago(10), retain_s=3600)
        record = store.get("live", tenant="acme")
        assert record is not None and record.expires_at == ago(10) + timedelta(seconds=3600)
        assert store.expired_at("live", tenant="acme") is None
        assert len(store.timeline("live", tenant="acme")) == 2

    def test_no_retention_keeps_the_task(self, store: ResultStore) -> None:
        finished(store, "kept", ago(10 * 86400), retain_s=None)
        record = store.get("kept", tenant="acme")
        assert record is not None and record.expires_at is None
        assert store.sweep_expired(now=NOW, tombstone_s=0).purged == 0
        assert store.get("kept", tenant="acme") is not None

    def test_non_terminal_events_never_expire_a_task(self, store: ResultStore) -> None:
        store.apply(update("busy", "pre", "processing", ago(100), retain_s=1))
        record = store.get("busy", tenant="acme")
        assert record is not None and record.expires_at is None

    def test_expired_task_reads_as_gone_before_any_sweep(self, store: ResultStore) -> None:
        finished(store, "old", ago(100), retain_s=50)
        assert store.get("old", tenant="acme") is None
        assert store.get("old") is None
        assert store.timeline("old", tenant="acme") == []
        assert store.expired_at("old", tenant="acme") == ago(50)
        assert store.expired_at("old", tenant="globex") is None  # another tenant: unknown

    def test_sweep_purges_expired_keeps_tombstone_then_deletes(self, store: ResultStore) -> None:
        finished(store, "old", ago(100), retain_s=50)
        finished(store, "new", ago(1), retain_s=3600)
        store.claim_notification("old", "acme-old-mod", "https://example.com/hook", tenant="acme")
        report = store.sweep_expired(now=NOW, tombstone_s=3600, limit=1)  # chunks of one row
        assert (report.events, report.purged, report.deleted) == (2, 1, 0)
        assert store.expired_at("old", tenant="acme") == ago(50)  # the tombstone says why
        assert store.reserve("old", "acme", time=NOW, digest="d").new is False  # id still taken
        assert store.notification("old", tenant="acme") is not None  # no second webhook
        live = store.get("new", tenant="acme")
        assert live is not None and live.result == {"model": "m", "text": "secret"}
        assert len(store.timeline("new", tenant="acme")) == 2
        again = store.sweep_expired(now=NOW, tombstone_s=3600)
        assert (again.events, again.purged, again.deleted) == (0, 0, 0)  # idempotent
        gone = store.sweep_expired(now=NOW, tombstone_s=10)  # past the tombstone horizon
        assert gone.deleted == 1
        assert store.expired_at("old", tenant="acme") is None
        assert store.notification("old", tenant="acme") is None
        assert store.get("new", tenant="acme") is not None

    def test_sweep_clears_outcome_of_the_tombstone(
        self, store: ResultStore, store_url: str
    ) -> None:
        finished(store, "old", ago(100), retain_s=50)
        store.sweep_expired(now=NOW, tombstone_s=None)
        # Read the raw row: the public reads already hide it.
        rows = _raw(store_url, "SELECT result, moderation, error, callback_url FROM tasks")
        assert rows == [(None, None, None, None)]
        assert _raw(store_url, "SELECT count(*) FROM task_events") == [(0,)]

    def test_per_tenant_expiry(self, store: ResultStore) -> None:
        finished(store, "t", ago(100), retain_s=50, tenant="acme")
        finished(store, "t", ago(100), retain_s=500, tenant="globex")
        assert store.get("t", tenant="acme") is None
        assert store.get("t", tenant="globex") is not None

    # --- result reuse -----------------------------------------------------------------------

    def test_first_claim_runs_then_identical_hits(self, store: ResultStore) -> None:
        a = ReuseClaim("acme", "k1", "task-a")
        assert [x.outcome for x in store.reuse_begin([a], lease_s=60)] == ["run"]
        b = ReuseClaim("acme", "k1", "task-b")
        waiting = store.reuse_begin([b], lease_s=60)[0]
        assert (waiting.outcome, waiting.task_id) == ("wait", "task-a")
        store.reuse_finish([ReuseEntry(a, "m", {"text": "hi"}, NOW + timedelta(hours=1))], [])
        hit = store.reuse_begin([b], lease_s=60)[0]
        assert (hit.outcome, hit.task_id, hit.model, hit.result) == (
            "hit",
            "task-a",
            "m",
            {"text": "hi"},
        )

    def test_keys_are_per_tenant(self, store: ResultStore) -> None:
        a = ReuseClaim("acme", "k1", "task-a")
        store.reuse_begin([a], lease_s=60)
        store.reuse_finish([ReuseEntry(a, "m", {"text": "hi"}, NOW + timedelta(hours=1))], [])
        other = store.reuse_begin([ReuseClaim("globex", "k1", "task-a")], lease_s=60)[0]
        assert other.outcome == "run"

    def test_failed_claim_is_released_and_stale_claim_taken_over(self, store: ResultStore) -> None:
        a, b = ReuseClaim("acme", "k", "task-a"), ReuseClaim("acme", "k", "task-b")
        store.reuse_begin([a], lease_s=60)
        store.reuse_finish([], [a])  # task-a's model call failed
        assert store.reuse_begin([b], lease_s=0.001)[0].outcome == "run"
        threading.Event().wait(0.05)  # b's lease has lapsed (b crashed)
        assert store.reuse_begin([a], lease_s=60)[0].outcome == "run"

    def test_a_redelivered_claimant_runs_again(self, store: ResultStore) -> None:
        a = ReuseClaim("acme", "k", "task-a")
        store.reuse_begin([a], lease_s=60)
        assert store.reuse_begin([a], lease_s=60)[0].outcome == "run"

    def test_expired_entry_misses_and_is_swept(self, store: ResultStore) -> None:
        a = ReuseClaim("acme", "k", "task-a")
        store.reuse_begin([a], lease_s=60)
        store.reuse_finish([ReuseEntry(a, "m", {"text": "hi"}, ago(1))], [])
        assert store.sweep_expired(now=NOW, tombstone_s=None).reuse == 1
        b = ReuseClaim("acme", "k", "task-b")
        assert store.reuse_begin([b], lease_s=60)[0].outcome == "run"

    def test_entry_past_its_ttl_is_not_a_hit_before_the_sweep(self, store: ResultStore) -> None:
        a = ReuseClaim("acme", "k", "task-a")
        store.reuse_begin([a], lease_s=60)
        store.reuse_finish([ReuseEntry(a, "m", {"text": "old"}, ago(1))], [])
        assert store.reuse_begin([ReuseClaim("acme", "k", "b")], lease_s=60)[0].outcome == "run"

    def test_racing_identical_claims_run_once(self, store_url: str) -> None:
        # Eight store objects (connections), one key: exactly one claims it.
        stores = [open_store(store_url) for _ in range(8)]
        outcomes: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(len(stores))

        def claim(i: int) -> None:
            start.wait(10)
            found = stores[i].reuse_begin([ReuseClaim("acme", "race", f"t{i}")], lease_s=60)
            with lock:
                outcomes.append(found[0].outcome)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for s in stores:
            s.close()
        assert sorted(outcomes) == ["run"] + ["wait"] * 7


def _raw(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    if store_url.startswith("sqlite:///"):
        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            return [tuple(r) for r in conn.execute(sql).fetchall()]
    import psycopg

    with psycopg.connect(store_url) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


class TestSqliteLifecycle(LifecycleContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'lifecycle.db'}"


def test_open_adds_the_new_column_and_table_to_an_existing_file(tmp_path: Path) -> None:
    # A file of the per-tenant layout written before retention and reuse existed.
    path = tmp_path / "before.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE tasks (tenant TEXT NOT NULL DEFAULT '', task_id TEXT NOT NULL, "
            "status TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, kind TEXT, "
            "stage TEXT, result TEXT, verdict TEXT, moderation TEXT, trace_id TEXT, error TEXT, "
            "callback_url TEXT, completed_at TEXT, digest TEXT, PRIMARY KEY (tenant, task_id));"
            "INSERT INTO tasks VALUES ('acme', 't1', 'completed', '2026-01-01T00:00:00+00:00', "
            "'2026-01-01T00:00:00+00:00', 'embed', 'moderation', '{\"x\":1}', 'allow', NULL, "
            "NULL, NULL, NULL, '2026-01-01T00:00:00+00:00', NULL);"
        )
    store = open_store(f"sqlite:///{path}")
    try:
        record = store.get("t1", tenant="acme")
        assert record is not None and record.result == {"x": 1} and record.expires_at is None
        assert store.reuse_begin([ReuseClaim("acme", "k", "t1")], lease_s=1)[0].outcome == "run"
    finally:
        store.close()
