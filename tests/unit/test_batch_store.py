"""The batch part of the result store (`conveyor.store.batches`) on SQLite; the same contract runs
against PostgreSQL in tests/integration/test_batch_store_postgres.py. Also the batch lifecycle
(`conveyor.batches.lifecycle`) over a real store: completion, cancel, expiry, precedence."""

from __future__ import annotations

import threading
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


class DispatchContract:
    """Paced dispatch (`conveyor.store.dispatch`) over a real store; subclasses give
    `store_url`, a database of the test's own (the window counts every batch in it)."""

    @pytest.fixture
    def store(self, store_url: str) -> Iterator[Any]:
        opened = open_store(store_url)
        yield opened
        opened.close()

    def make(self, store: Any, count: int, *, tenant: str = "acme", minute: int = 0) -> Any:
        batch_id = lifecycle.new_batch_id()
        lines = _lines(batch_id, count)
        return lifecycle.create(
            store,
            lines,
            batch_id=batch_id,
            tenant=tenant,
            window="1h",
            now=T0 + timedelta(minutes=minute),
            digest=lambda body: "d",
        )

    def claim(self, store: Any, window: int | None, *, at: datetime | None = None) -> list[Any]:
        return store.claim_dispatch(window=window, lease_s=60, now=at or datetime.now(UTC))

    def test_claims_keep_the_window_in_input_order_and_refill_as_tasks_end(
        self, store: Any
    ) -> None:
        batch = self.make(store, 10)
        first = self.claim(store, 4)
        assert [i.line for i in first] == [1, 2, 3, 4]
        assert first[0].body["task_id"] == f"{batch.batch_id}.1"
        assert first[0].body["priority"] == "low"
        assert self.claim(store, 4) == []  # claimed counts against the window
        store.finish_dispatch(dispatched=first)
        assert self.claim(store, 4) == []  # dispatched and unfinished: still in flight
        for item in first[:3]:
            _finish(store, item.task_id, "completed")
        assert [i.line for i in self.claim(store, 4)] == [5, 6, 7]
        assert len(self.claim(store, None)) == 3  # no bound: the rest at once
        assert self.claim(store, None) == []

    def test_room_is_refilled_in_chunks_of_min_free(self, store: Any) -> None:
        self.make(store, 20)
        now = datetime.now(UTC)
        first = store.claim_dispatch(window=8, lease_s=60, now=now, min_free=4)
        store.finish_dispatch(dispatched=first)
        for item in first[:3]:
            _finish(store, item.task_id, "completed")
        assert store.claim_dispatch(window=8, lease_s=60, now=now, min_free=4) == []
        _finish(store, first[3].task_id, "completed")
        again = store.claim_dispatch(window=8, lease_s=60, now=now, min_free=4)
        assert [i.line for i in again] == [9, 10, 11, 12]

    def test_released_and_lapsed_claims_are_claimed_again(self, store: Any) -> None:
        self.make(store, 3)
        now = datetime.now(UTC)
        first = self.claim(store, 2, at=now)
        store.finish_dispatch(dispatched=[], released=first[:1])  # the broker refused it
        assert [i.line for i in self.claim(store, 2, at=now)] == [1]
        # Line 2's replica died mid-publish: once its claim lapses, it is claimed again.
        later = now + timedelta(seconds=61)
        assert [i.line for i in self.claim(store, 2, at=later)] == [1, 2]

    def test_two_replicas_never_claim_the_same_item_nor_overfill_the_window(
        self, store: Any, store_url: str
    ) -> None:
        self.make(store, 300)
        other = open_store(store_url)
        claimed: list[list[Any]] = [[], []]

        def replica(n: int, target: Any) -> None:
            for _ in range(20):
                claimed[n].extend(self.claim(target, 50))

        try:
            threads = [
                threading.Thread(target=replica, args=(0, store)),
                threading.Thread(target=replica, args=(1, other)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            other.close()
        lines = [i.line for i in claimed[0] + claimed[1]]
        assert len(lines) == 50 and len(set(lines)) == 50  # the window, each item once

    def test_batches_share_the_window_round_robin_across_tenants(self, store: Any) -> None:
        big = self.make(store, 50, tenant="acme", minute=0)
        second = self.make(store, 50, tenant="acme", minute=1)
        small = self.make(store, 3, tenant="beta", minute=2)
        chosen = self.claim(store, 8)
        per_batch = {
            b.batch_id: [i.line for i in chosen if i.batch_id == b.batch_id]
            for b in (big, second, small)
        }
        # One item per tenant per turn (beta's small batch is not starved by acme's two big
        # ones); acme's turns alternate between its batches; beta runs out, acme takes the rest.
        assert per_batch == {
            big.batch_id: [1, 2, 3],
            second.batch_id: [1, 2],
            small.batch_id: [1, 2, 3],
        }

    def test_stop_gives_the_never_dispatched_tasks_and_dispatch_skips_the_batch(
        self, store: Any
    ) -> None:
        stopped = self.make(store, 5)
        store.finish_dispatch(dispatched=self.claim(store, 2))
        never = store.stop_dispatch("acme", stopped.batch_id, now=datetime.now(UTC))
        assert never == [f"{stopped.batch_id}.{n}" for n in (3, 4, 5)]
        assert self.claim(store, None) == []
        assert store.stop_dispatch("acme", stopped.batch_id, now=datetime.now(UTC)) == []
        for n in (1, 2):
            _finish(store, f"{stopped.batch_id}.{n}", "completed")
        batch = self.make(store, 5)
        store.finish_dispatch(dispatched=self.claim(store, 2))
        store.set_batch_status(
            "acme", batch.batch_id, BatchStatus.CANCELLING, expect=[BatchStatus.IN_PROGRESS]
        )
        calls: list[tuple[str, str]] = []

        def cancel_task(task_id: str, tenant: str) -> None:
            calls.append((task_id, tenant))
            _finish(store, task_id, "cancelled")

        ended = lifecycle.refresh(store, store.get_batch("acme", batch.batch_id),
                                  datetime.now(UTC), cancel_task)  # fmt: skip
        assert ended.status == BatchStatus.CANCELLED
        # Dispatched: the ordinary task cancel; never dispatched: the store only.
        assert calls == [(f"{batch.batch_id}.{n}", "acme") for n in (1, 2)]
        assert store.batch_counts("acme", batch.batch_id)["cancelled"] == 5

    def test_a_cancelled_batch_frees_its_window_for_the_next(self, store: Any) -> None:
        first = self.make(store, 6, minute=0)
        second = self.make(store, 6, minute=1)
        store.finish_dispatch(dispatched=self.claim(store, 4))
        lifecycle.cancel(store, first, datetime.now(UTC))  # no canceller: the store ends them
        lifecycle.cancel(store, second, datetime.now(UTC))
        third = self.make(store, 6, minute=2)
        assert {i.batch_id for i in self.claim(store, 4)} == {third.batch_id}

    def test_list_is_the_tenants_batches_newest_first_with_a_cursor(self, store: Any) -> None:
        made = [self.make(store, 1, minute=m) for m in range(5)]
        self.make(store, 1, tenant="beta")
        newest = [b.batch_id for b in reversed(made)]
        assert [b.batch_id for b in store.list_batches("acme", limit=3)] == newest[:3]
        page = store.list_batches("acme", limit=3, after=newest[2])
        assert [b.batch_id for b in page] == newest[3:]
        assert store.list_batches("beta", limit=10, after=newest[0]) == []


class TestSqliteDispatch(DispatchContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'conveyor.db'}"


class TestSqliteBatchStore(BatchStoreContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'conveyor.db'}"
