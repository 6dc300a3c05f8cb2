"""The batch part of the result store (`conveyor.store.batches`) on SQLite; the same contract runs
against PostgreSQL in tests/integration/test_batch_store_postgres.py. Also the batch lifecycle
(`conveyor.batches.lifecycle`) over a real store: completion, cancel, expiry, precedence."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.batches import lifecycle
from conveyor.batches.jsonl import BatchInput, parse_batch
from conveyor.store import TaskUpdate, open_store
from conveyor.store.batches import BatchConflictError, BatchStatus

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _lines(batch_id: str, count: int) -> Any:
    text = "\n".join(
        f'{{"custom_id": "c-{i}", "body": {{"kind": "embed", "input": "text {i}"}}}}'
        for i in range(count)
    )
    spec = BatchInput(
        tenant="acme",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        task_id=lambda n: lifecycle.batch_task_id(batch_id, n),
    )
    return parse_batch(text.encode(), spec)


def _finish(store: Any, task_id: str, status: str, minute: int = 1) -> None:
    store.apply(
        TaskUpdate(
            task_id=task_id,
            event_id=f"{task_id}-{status}",
            event_type="conveyor.task.moderated.v1",
            status=status,
            time=T0 + timedelta(minutes=minute),
            tenant="acme",
            kind="embed",
            stage="moderation",
            result={"model": "m", "embedding": [0.5]} if status == "completed" else None,
            verdict="allow" if status == "completed" else None,
        )
    )


class BatchStoreContract:
    """What both backends must do; subclasses give `store_url`."""

    @pytest.fixture
    def store(self, store_url: str) -> Iterator[Any]:
        opened = open_store(store_url)
        yield opened
        opened.close()

    def make(self, store: Any, count: int, *, window: str = "1h") -> Any:
        batch_id = lifecycle.new_batch_id()
        return lifecycle.create(
            store,
            _lines(batch_id, count),
            batch_id=batch_id,
            tenant="acme",
            window=window,
            now=T0,
            digest=lambda body: "d",
            metadata={"job": "nightly"},
        )

    def test_created_batch_reserves_every_task_pending_in_input_order(self, store: Any) -> None:
        batch = self.make(store, 5)
        stored = store.get_batch("acme", batch.batch_id)
        assert stored == batch
        assert store.batch_counts("acme", batch.batch_id)["pending"] == 5
        page = store.batch_results("acme", batch.batch_id, after_line=0, limit=3)
        assert [(i.line, i.custom_id) for i, _ in page] == [(1, "c-0"), (2, "c-1"), (3, "c-2")]
        assert all(t is not None and t.status == "pending" for _, t in page)
        rest = store.batch_results("acme", batch.batch_id, after_line=3, limit=10)
        assert [i.custom_id for i, _ in rest] == ["c-3", "c-4"]
        task_id = page[0][0].task_id
        assert store.batch_of(task_id, tenant="acme") == batch.batch_id
        assert store.batch_of(task_id, tenant="beta") is None
        assert store.get_batch("beta", batch.batch_id) is None

    def test_a_taken_task_id_creates_nothing(self, store: Any) -> None:
        batch_id = lifecycle.new_batch_id()
        store.reserve(lifecycle.batch_task_id(batch_id, 2), "acme", time=T0, digest="x")
        with pytest.raises(BatchConflictError):
            lifecycle.create(
                store,
                _lines(batch_id, 3),
                batch_id=batch_id,
                tenant="acme",
                window="1h",
                now=T0,
                digest=lambda body: "d",
            )
        assert store.get_batch("acme", batch_id) is None
        assert store.get(lifecycle.batch_task_id(batch_id, 1), tenant="acme") is None

    def test_batch_completes_when_every_task_ended(self, store: Any) -> None:
        batch = self.make(store, 3)
        ids = store.batch_unfinished("acme", batch.batch_id, limit=10)
        assert len(ids) == 3
        for task_id in ids[:2]:
            _finish(store, task_id, "completed")
        now = T0 + timedelta(minutes=5)
        assert lifecycle.refresh(store, batch, now).status == BatchStatus.IN_PROGRESS
        _finish(store, ids[2], "failed")
        done = lifecycle.refresh(store, batch, now)
        assert done.status == BatchStatus.COMPLETED
        assert done.ended_at == now
        counts = store.batch_counts("acme", batch.batch_id)
        assert (counts["completed"], counts["failed"], counts["pending"]) == (2, 1, 0)

    def test_cancel_ends_unfinished_tasks_cancelled_and_keeps_finished_ones(
        self, store: Any
    ) -> None:
        batch = self.make(store, 1200)  # more than one END_CHUNK round
        ids = store.batch_unfinished("acme", batch.batch_id, limit=2000)
        for task_id in ids[:10]:
            _finish(store, task_id, "completed")
        cancelled = lifecycle.cancel(store, batch, T0 + timedelta(minutes=2))
        assert cancelled.status == BatchStatus.CANCELLED
        counts = store.batch_counts("acme", batch.batch_id)
        assert (counts["completed"], counts["cancelled"]) == (10, 1190)
        # A late result of a cancelled task loses to its terminal status.
        _finish(store, ids[50], "completed", minute=9)
        assert store.get(ids[50], tenant="acme").status == "cancelled"
        assert store.timeline(ids[50], tenant="acme")[-2].status == "cancelled"
        # Cancelling again, or reading, changes nothing.
        assert lifecycle.cancel(store, cancelled, T0 + timedelta(minutes=3)) == cancelled

    def test_window_passed_expires_unfinished_tasks(self, store: Any) -> None:
        batch = self.make(store, 4, window="30s")
        assert batch.expires_at == T0 + timedelta(seconds=30)
        ids = store.batch_unfinished("acme", batch.batch_id, limit=10)
        _finish(store, ids[0], "completed")
        early = lifecycle.refresh(store, batch, T0 + timedelta(seconds=10))
        assert early.status == BatchStatus.IN_PROGRESS
        late = lifecycle.refresh(store, batch, T0 + timedelta(seconds=31))
        assert late.status == BatchStatus.EXPIRED
        counts = store.batch_counts("acme", batch.batch_id)
        assert (counts["completed"], counts["expired"]) == (1, 3)
        task = store.get(ids[1], tenant="acme")
        assert task.error is not None and "completion window 30s passed" in task.error
        # An expired batch is not cancelled afterwards.
        assert lifecycle.cancel(store, late, T0 + timedelta(minutes=1)).status == "expired"

    def test_batch_whose_tasks_all_ended_is_completed_even_when_read_after_its_window(
        self, store: Any
    ) -> None:
        batch = self.make(store, 2, window="30s")
        for task_id in store.batch_unfinished("acme", batch.batch_id, limit=10):
            _finish(store, task_id, "completed")
        late = lifecycle.refresh(store, batch, T0 + timedelta(minutes=5))
        assert late.status == BatchStatus.COMPLETED
        assert store.batch_counts("acme", batch.batch_id)["completed"] == 2

    def test_sweep_ends_batches_past_their_window_or_left_mid_cancel(self, store: Any) -> None:
        late = self.make(store, 2, window="30s")
        cancelling = self.make(store, 2, window="1h")
        running = self.make(store, 2, window="1h")
        store.set_batch_status(
            "acme", cancelling.batch_id, BatchStatus.CANCELLING, expect=[BatchStatus.IN_PROGRESS]
        )
        # Other sessions' batches share the database (PostgreSQL): sweep until ours are done.
        for _ in range(20):
            if not lifecycle.sweep(store, T0 + timedelta(minutes=1)):
                break
        status = {
            b.batch_id: store.get_batch("acme", b.batch_id).status
            for b in (late, cancelling, running)
        }
        assert status == {
            late.batch_id: BatchStatus.EXPIRED,
            cancelling.batch_id: BatchStatus.CANCELLED,
            running.batch_id: BatchStatus.IN_PROGRESS,
        }
        assert store.batch_counts("acme", cancelling.batch_id)["cancelled"] == 2

    def test_set_status_moves_only_from_the_expected_status(self, store: Any) -> None:
        batch = self.make(store, 1)
        args = ("acme", batch.batch_id, BatchStatus.CANCELLING)
        assert not store.set_batch_status(*args, expect=[BatchStatus.COMPLETED])
        assert store.set_batch_status(*args, expect=[BatchStatus.IN_PROGRESS])
        assert store.get_batch("acme", batch.batch_id).status == BatchStatus.CANCELLING


class TestSqliteBatchStore(BatchStoreContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'conveyor.db'}"
