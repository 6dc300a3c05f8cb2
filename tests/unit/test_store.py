"""Result store: the precedence rule, and the behaviour contract every backend must keep.

`StoreContract` and `SharedStoreContract` are written once and run here against SQLite (in memory
and on a file) and in tests/integration/test_store_postgres.py against a real PostgreSQL; a
backend's test class only provides the `store_url` fixture (and `clean_store` for shared servers).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from conveyor.errors import RetryableError
from conveyor.store import (
    REJECTED_RECORD,
    STATUSES,
    AmbiguousTaskError,
    ResultStore,
    TaskStatus,
    TaskUpdate,
    is_terminal,
    merge_task,
    open_dialect,
    open_store,
    status_wins,
)
from conveyor.store import sqlite as sqlite_backend

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def update(task_id: str, event_id: str, status: str, seconds: float, **fields: Any) -> TaskUpdate:
    fields.setdefault("tenant", "acme")
    return TaskUpdate(
        task_id, event_id, f"conveyor.task.{status}.v1", status, at(seconds), **fields
    )


# --- the precedence rule, pure ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "current_s", "new", "new_s", "wins"),
    [
        (None, None, "pending", 0, True),
        ("completed", 5, "processing", 9, False),  # late non-terminal never beats terminal
        ("failed", 5, "retrying", 9, False),
        ("processing", 9, "completed", 5, True),  # terminal beats non-terminal, whatever the time
        ("failed", 5, "completed", 9, False),  # a finished task stays finished...
        ("completed", 5, "failed", 9, False),  # ...whichever terminal came first
        ("completed", 9, "failed", 5, False),
        ("completed", 5, "expired", 5, False),
        ("retrying", 5, "processing", 3, False),  # non-terminal: newer wins
        ("processing", 3, "retrying", 5, True),
        ("pending", 5, "processing", 5, True),  # same time: work in progress beats pending
        ("processing", 5, "pending", 5, False),
    ],
)
def test_status_precedence(
    current: str | None, current_s: float | None, new: str, new_s: float, wins: bool
) -> None:
    current_time = None if current_s is None else at(current_s)
    assert status_wins(current, current_time, new, at(new_s)) is wins


# Every (stored, incoming) pair of statuses, with the incoming event older, as old or newer, from
# the pipeline or from an operator re-run (redrive/replay).
ALL_PAIRS = [
    (current, new, delta, override)
    for current in sorted(STATUSES)
    for new in sorted(STATUSES)
    for delta in (-1, 0, 1)
    for override in (False, True)
]


def expected_winner(current: str, new: str, delta: int, override: bool) -> str:
    """The precedence rule as the issue states it, written independently of `status_wins`."""
    if is_terminal(current):  # finished stays finished, but for a newer operator re-run
        return new if override and delta > 0 else current
    if is_terminal(new):  # a terminal status ends any work in progress, whatever the clocks say
        return new
    if delta == 0:
        return new if current == "pending" and new in ("processing", "retrying") else current
    return new if delta > 0 else current


def test_terminal_statuses_are_exactly_the_five_final_ones() -> None:
    assert {s for s in STATUSES if is_terminal(s)} == {
        "completed",
        "blocked",
        "failed",
        "expired",
        "cancelled",
    }
    assert {s.value for s in TaskStatus} == STATUSES


@pytest.mark.parametrize(("current", "new", "delta", "override"), ALL_PAIRS)
def test_status_precedence_for_every_pair(
    current: str, new: str, delta: int, override: bool
) -> None:
    wins = status_wins(current, at(5), new, at(5 + delta), override=override)
    assert (new if wins else current) == expected_winner(current, new, delta, override)


def test_merge_losing_update_fills_gaps_but_overwrites_nothing() -> None:
    done = merge_task(None, update("t", "e1", "completed", 5, stage="writeback", trace_id=None))
    merged = merge_task(done, update("t", "e2", "processing", 9, stage="inference", trace_id="ab"))
    assert (merged.status, merged.stage, merged.trace_id) == ("completed", "writeback", "ab")
    assert merged.updated_at == at(5) and merged.completed_at == at(5)


def test_task_update_rejects_naive_time_and_unknown_values() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TaskUpdate("t", "e", "x", "pending", datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="status"):
        TaskUpdate("t", "e", "x", "done", T0)
    with pytest.raises(ValueError, match="verdict"):
        TaskUpdate("t", "e", "x", "completed", T0, verdict="maybe")


# --- the backend contract --------------------------------------------------------------------


class StoreContract:
    """Behaviour every `ResultStore` backend keeps; subclasses provide `store_url`."""

    @pytest.fixture
    def store(self, store_url: str) -> Iterator[ResultStore]:
        opened = open_store(store_url)
        yield opened
        opened.close()

    def test_first_event_creates_task_with_event_times(self, store: ResultStore) -> None:
        assert store.apply(update("t1", "e1", "pending", 0, kind="generate", trace_id="tr"))
        task = store.get("t1")
        assert task is not None
        assert (task.status, task.kind, task.trace_id, task.tenant) == (
            "pending",
            "generate",
            "tr",
            "acme",
        )
        assert task.created_at == task.updated_at == at(0) and task.completed_at is None

    def test_duplicate_event_id_is_ignored(self, store: ResultStore) -> None:
        assert store.apply(update("t1", "e1", "pending", 0)) is True
        assert store.apply(update("t1", "e1", "completed", 5, result={"text": "x"})) is False
        task = store.get("t1")
        assert task is not None and task.status == "pending" and task.result is None
        assert [e.event_id for e in store.timeline("t1")] == ["e1"]

    def test_late_processing_never_overwrites_completed(self, store: ResultStore) -> None:
        store.apply(update("t1", "e3", "completed", 3, stage="writeback", result={"text": "hi"}))
        store.apply(update("t1", "e2", "processing", 9, stage="inference"))
        task = store.get("t1")
        assert task is not None
        assert (task.status, task.stage, task.result) == ("completed", "writeback", {"text": "hi"})
        assert task.completed_at == at(3) and task.updated_at == at(3)

    def test_redriven_failed_task_becomes_completed(self, store: ResultStore) -> None:
        rerun = "redrive conveyor.inference.dlq:0:4"
        store.apply(update("t1", "e1", "failed", 5, error="dead-lettered: timeout"))
        store.apply(update("t1", "e2", "completed", 50, result=[1.0]))  # not a re-run: ignored
        assert self.status_of(store, "t1") == "failed"
        note = f"operator {rerun}"
        store.apply(update("t1", "e3", "processing", 40, override=rerun, detail=note))
        store.apply(update("t1", "e4", "completed", 60, result=[0.25, -1.5], override=rerun))
        store.apply(update("t1", "e5", "retrying", 55, override=rerun))  # older than completed
        store.apply(update("t1", "e0", "expired", 1))  # older terminal: ignored
        task = store.get("t1")
        assert task is not None
        assert (task.status, task.result, task.completed_at) == ("completed", [0.25, -1.5], at(60))
        assert task.error == "dead-lettered: timeout"  # None never erases; the timeline tells
        assert note in [e.detail for e in store.timeline("t1")]

    def test_stale_or_duplicate_failure_never_overrides_a_terminal_outcome(
        self, store: ResultStore
    ) -> None:
        store.apply(update("t1", "e1", "completed", 5, result={"text": "hi"}))
        store.apply(update("t1", "e2", "failed", 9, stage="inference", error="late dead letter"))
        store.apply(update("t1", "e3", "expired", 10))
        task = store.get("t1")
        assert task is not None
        assert (task.status, task.result, task.error) == ("completed", {"text": "hi"}, None)
        assert task.updated_at == task.completed_at == at(5)

    def test_every_status_pair_follows_the_precedence_rule(self, store: ResultStore) -> None:
        # One batch (one transaction): every pair on its own task, the stored status first.
        batch = []
        for n, (current, new, delta, override) in enumerate(ALL_PAIRS):
            batch.append(update(f"p{n}", f"p{n}-a", current, 5))
            rerun = "replay conveyor.task.inferred:0:1" if override else None
            batch.append(update(f"p{n}", f"p{n}-b", new, 5 + delta, override=rerun))
        applied = store.apply_many(batch)
        assert all(a.new for a in applied)
        wrong = {}
        for n, pair in enumerate(ALL_PAIRS):
            task = store.get(f"p{n}")
            want = expected_winner(*pair)
            if task is None or task.status != want or applied[2 * n + 1].task.status != want:
                wrong[pair] = task.status if task else None
        assert not wrong, wrong
        assert len(store.timeline("p0")) == 2  # a losing event is still on the timeline

    def test_rejected_record_is_a_note_on_an_existing_task(self, store: ResultStore) -> None:
        store.apply(update("t1", "e1", "completed", 5, result={"text": "hi"}, trace_id="aa"))
        note = update(
            "t1",
            "e2",
            "failed",
            9,
            stage="preprocess",
            tenant="globex",
            error="DecodeError: not JSON",
            callback_url="https://evil",
            detail="rejected record: DecodeError: not JSON",
            rejected_record=True,
        )
        [applied] = store.apply_many([note])
        assert applied.new and applied.task.status == "completed"
        task = store.get("t1")
        assert task is not None
        assert (task.status, task.result, task.error, task.tenant, task.callback_url) == (
            "completed",
            {"text": "hi"},
            None,
            "acme",
            None,
        )
        assert task.updated_at == at(5) and task.stage is None
        entries = [(e.status, e.detail) for e in store.timeline("t1")]
        assert entries[-1] == (REJECTED_RECORD, "rejected record: DecodeError: not JSON")

    def test_rejected_record_without_a_task_records_a_failed_task(self, store: ResultStore) -> None:
        reason = "DecodeError: structured CloudEvent is not JSON"
        note = update("t9", "e1", "failed", 3, error=reason, rejected_record=True)
        [applied] = store.apply_many([note])
        assert applied.new and applied.task.status == "failed"
        task = store.get("t9")
        assert task is not None and (task.status, task.error) == ("failed", reason)
        assert [e.status for e in store.timeline("t9")] == [REJECTED_RECORD]
        # A second rejected record for that id is a note on the failed task, like any other.
        store.apply(update("t9", "e2", "failed", 4, error="other", rejected_record=True))
        task = store.get("t9")
        assert task is not None and task.error == reason

    @staticmethod
    def status_of(store: ResultStore, task_id: str) -> str | None:
        task = store.get(task_id)
        return None if task is None else task.status

    def test_none_fields_do_not_erase_stored_values(self, store: ResultStore) -> None:
        store.apply(update("t1", "e1", "pending", 0, callback_url="https://cb", kind="embed"))
        store.apply(update("t1", "e2", "processing", 1))  # names no kind and no callback
        task = store.get("t1")
        assert task is not None
        assert (task.tenant, task.kind, task.callback_url) == ("acme", "embed", "https://cb")

    def test_blocked_task_withholds_result(self, store: ResultStore) -> None:
        store.apply(update("t1", "e1", "processing", 1, result={"text": "bad words"}))
        store.apply(
            update(
                "t1",
                "e2",
                "blocked",
                2,
                verdict="block",
                moderation={"scores": {"toxic": 0.97}, "reasons": ["toxic"]},
            )
        )
        task = store.get("t1")
        assert task is not None and task.status == "blocked" and task.result is None
        assert task.verdict == "block" and task.moderation["reasons"] == ["toxic"]

    def test_equal_ids_of_two_tenants_are_two_tasks(self, store: ResultStore) -> None:
        # A task is (tenant, task id): globex's event can never touch acme's task.
        store.apply(update("t1", "e1", "pending", 0, tenant="acme", kind="embed"))
        store.apply(update("t1", "e2", "completed", 5, tenant="globex", result={"x": 1}))
        acme, globex = store.get("t1", tenant="acme"), store.get("t1", tenant="globex")
        assert acme is not None and (acme.status, acme.tenant, acme.result) == (
            "pending",
            "acme",
            None,
        )
        assert globex is not None and (globex.status, globex.tenant) == ("completed", "globex")
        assert [e.event_id for e in store.timeline("t1", tenant="acme")] == ["e1"]
        assert [e.event_id for e in store.timeline("t1", tenant="globex")] == ["e2"]
        with pytest.raises(AmbiguousTaskError, match="acme.*globex"):
            store.get("t1")  # without a tenant, an id of two tenants names no one task
        with pytest.raises(AmbiguousTaskError):
            store.timeline("t1")
        assert store.count_by_status()["pending"] == store.count_by_status()["completed"] == 1

    def test_task_without_a_tenant_is_its_own_task(self, store: ResultStore) -> None:
        store.apply(update("t1", "e1", "processing", 0, tenant=None))
        store.apply(update("t1", "e2", "processing", 0, tenant="acme"))
        anonymous = store.get("t1", tenant="")
        assert anonymous is not None and anonymous.tenant is None
        assert [e.event_id for e in store.timeline("t1", tenant="")] == ["e1"]

    def test_reserve_inserts_a_pending_row_once_per_tenant(self, store: ResultStore) -> None:
        first = store.reserve("t1", "acme", time=at(0), digest="d1", kind="embed")
        again = store.reserve("t1", "acme", time=at(1), digest="d2")
        other = store.reserve("t1", "globex", time=at(2), digest="d3")
        assert (first.new, again.new, other.new) == (True, False, True)
        assert (first.digest, again.digest, other.digest) == ("d1", "d1", "d3")
        assert again.task == first.task and first.task.status == "pending"
        assert (first.task.kind, first.task.created_at, first.task.tenant) == (
            "embed",
            at(0),
            "acme",
        )
        assert store.timeline("t1", tenant="acme") == []  # a reservation is not an event

    def test_reserved_task_proceeds_through_the_pipeline(self, store: ResultStore) -> None:
        store.reserve("t1", "acme", time=at(0), digest="d1", callback_url="https://cb")
        store.apply(update("t1", "e1", "processing", 1, stage="preprocess"))
        store.apply(update("t1", "e2", "completed", 2, result={"text": "hi"}))
        task = store.get("t1", tenant="acme")
        assert task is not None and (task.status, task.callback_url, task.created_at) == (
            "completed",
            "https://cb",
            at(0),
        )
        assert not store.release("t1", "acme", "d1")  # published and processed: stays
        again = store.reserve("t1", "acme", time=at(3), digest="d1")
        assert not again.new and again.task.status == "completed"

    def test_release_frees_an_unpublished_reservation(self, store: ResultStore) -> None:
        store.reserve("t1", "acme", time=at(0), digest="d1")
        assert not store.release("t1", "acme", "other-submission")
        assert not store.release("t1", "globex", "d1")
        assert store.release("t1", "acme", "d1")
        assert store.get("t1", tenant="acme") is None
        assert store.reserve("t1", "acme", time=at(1), digest="d2").new

    def test_notifications_are_per_tenant(self, store: ResultStore) -> None:
        assert store.claim_notification("t1", "e1", "https://a", tenant="acme")
        assert store.claim_notification("t1", "e2", "https://g", tenant="globex")
        assert not store.claim_notification("t1", "e3", "https://a", tenant="acme")
        assert store.complete_notification("t1", 200, tenant="globex")
        acme = store.notification("t1", tenant="acme")
        globex = store.notification("t1", tenant="globex")
        assert acme is not None and (acme.status, acme.tenant, acme.url) == (
            "claimed",
            "acme",
            "https://a",
        )
        assert globex is not None and (globex.status, globex.http_status) == ("delivered", 200)
        assert store.release_notification("t1", tenant="acme")
        assert store.notification("t1", tenant="acme") is None
        assert store.notification("t1", tenant="globex") is not None

    def test_other_tenant_sees_nothing(self, store: ResultStore) -> None:
        store.apply(update("t1", "e1", "pending", 0, tenant="acme"))
        assert store.get("t1", tenant="acme") is not None
        assert store.get("t1", tenant="globex") is None
        assert store.timeline("t1", tenant="globex") == []
        assert len(store.timeline("t1", tenant="acme")) == 1
        assert store.get("missing") is None

    def test_timeline_is_ordered_by_event_time_not_arrival(self, store: ResultStore) -> None:
        for event_id, status, seconds in [
            ("c", "completed", 3),
            ("a", "pending", 0),
            ("b2", "retrying", 2),
            ("b1", "processing", 1),
        ]:
            store.apply(update("t1", event_id, status, seconds, detail=f"{status} note"))
        timeline = store.timeline("t1")
        assert [e.event_id for e in timeline] == ["a", "b1", "b2", "c"]
        assert timeline[1].detail == "processing note" and timeline[3].time == at(3)
        assert all(
            e.time.tzinfo is not None and e.time.utcoffset() == timedelta(0) for e in timeline
        )

    def test_times_are_stored_as_utc(self, store: ResultStore) -> None:
        local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
        store.apply(TaskUpdate("t1", "e1", "x", "pending", local))
        task = store.get("t1")
        assert task is not None and task.created_at == T0 and task.created_at.tzinfo == UTC

    def test_count_unfinished_counts_a_tenants_tasks_not_yet_terminal(
        self, store: ResultStore
    ) -> None:
        for i, status in enumerate(("pending", "processing", "retrying", "completed", "failed")):
            store.apply(update(f"t{i}", f"e{i}", status, 0, tenant="a"))
        store.apply(update("u", "eu", "pending", 0, tenant="b"))
        assert (store.count_unfinished("a"), store.count_unfinished("b")) == (3, 1)
        assert store.count_unfinished("nobody") == 0

    def test_count_by_status_lists_every_status(self, store: ResultStore) -> None:
        store.apply(update("t1", "e1", "completed", 0))
        store.apply(update("t2", "e2", "completed", 0))
        store.apply(update("t3", "e3", "retrying", 0))
        counts = store.count_by_status()
        assert counts["completed"] == 2 and counts["retrying"] == 1 and counts["expired"] == 0
        assert set(counts) == {
            "pending",
            "processing",
            "retrying",
            "completed",
            "blocked",
            "failed",
            "expired",
            "cancelled",
        }

    def test_apply_many_dedupes_within_and_across_batches(self, store: ResultStore) -> None:
        batch = [
            update("t1", "e1", "pending", 0),
            update("t1", "e1", "pending", 0),
            update("t2", "e2", "completed", 1),
        ]
        applied = store.apply_many(batch)
        assert [a.new for a in applied] == [True, False, True]
        assert [a.task.status for a in applied] == ["pending", "pending", "completed"]
        [again] = store.apply_many([update("t2", "e2", "completed", 1)])
        assert again.new is False and again.task.status == "completed"  # the row, for a redelivery

    def test_failed_batch_rolls_back_entirely(self, store: ResultStore) -> None:
        unserialisable = update("t2", "e2", "completed", 1, result={"x": object()})
        with pytest.raises(TypeError):
            store.apply_many([update("t1", "e1", "pending", 0), unserialisable])
        assert store.get("t1") is None and store.timeline("t1") == []
        assert store.apply(update("t1", "e1", "pending", 0)) is True  # usable afterwards

    def test_only_first_notification_claim_wins(self, store: ResultStore) -> None:
        assert store.claim_notification("t1", "ev", "https://cb") is True
        assert store.claim_notification("t1", "ev", "https://cb") is False
        assert store.complete_notification("t1", 204) is True
        assert store.release_notification("t1") is False  # a delivered notice stays delivered
        assert store.claim_notification("t1", "ev", "https://cb") is False
        [record] = store.list_notifications()
        assert (record.status, record.http_status, record.url) == ("delivered", 204, "https://cb")
        assert record.delivered_at is not None and record.delivered_at >= record.claimed_at
        assert store.notification("t1") == record
        assert store.notification("t2") is None

    def test_released_claim_can_be_claimed_again(self, store: ResultStore) -> None:
        assert store.claim_notification("t1", "ev", "https://cb")
        assert store.release_notification("t1") is True
        assert store.list_notifications() == []
        assert store.claim_notification("t1", "ev", "https://cb") is True
        assert store.complete_notification("t1", 410) is True
        assert store.list_notifications()[0].status == "rejected"
        assert store.complete_notification("t2", 200) is False  # never claimed

    def test_stale_claim_is_taken_over_only_with_a_lease(self, store: ResultStore) -> None:
        assert store.claim_notification("t1", "ev", "https://old")
        assert store.claim_notification("t1", "ev", "https://new", lease_s=3600) is False
        assert store.claim_notification("t1", "ev", "https://new", lease_s=0) is True
        assert store.list_notifications()[0].url == "https://new"


class SharedStoreContract(StoreContract):
    """Contract for stores that several processes open at once (a file, a server)."""

    def test_two_store_objects_apply_concurrently_without_loss(self, store_url: str) -> None:
        stores = [open_store(store_url), open_store(store_url)]
        tasks, per_task = 20, 6
        results: list[list[bool]] = [[], []]

        def work(index: int) -> None:
            # Both writers send every event (redelivery); each task's terminal event comes last.
            for n in range(tasks):
                for step in range(per_task):
                    status = "completed" if step == per_task - 1 else "processing"
                    item = update(f"t{n}", f"t{n}-e{step}", status, step)
                    results[index].append(stores[index].apply(item))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert sum(results[0]) + sum(results[1]) == tasks * per_task  # each event applied once
        assert stores[1].count_by_status()["completed"] == tasks
        assert len(stores[0].timeline("t7")) == per_task
        for opened in stores:
            opened.close()

    def test_concurrent_reservations_take_each_id_once_per_tenant(self, store_url: str) -> None:
        # Two store objects (two gateway replicas) reserve the same ids at once: per (tenant, id)
        # exactly one call wins, whichever store it ran on.
        stores = [open_store(store_url) for _ in range(4)]
        won: list[tuple[str, str]] = []
        lock = threading.Lock()

        def work(index: int) -> None:
            tenant = ("acme", "globex")[index % 2]
            for n in range(15):
                got = stores[index].reserve(f"r{n}", tenant, time=at(n), digest=f"d{index}")
                if got.new:
                    with lock:
                        won.append((tenant, f"r{n}"))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert sorted(won) == sorted((t, f"r{n}") for t in ("acme", "globex") for n in range(15))
        assert stores[0].count_by_status()["pending"] == 30
        for opened in stores:
            opened.close()

    def test_stores_opened_at_once_create_the_schema_once(self, store_url: str) -> None:
        # Services starting together: schema creation is serialised (`Dialect.lock_schema`).
        opened: list[ResultStore] = []
        failures: list[BaseException] = []

        def open_one() -> None:
            try:
                opened.append(open_store(store_url))
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)

        threads = [threading.Thread(target=open_one) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert not failures and len(opened) == 3
        assert opened[0].apply(update("t1", "e1", "pending", 0))
        assert all(s.get("t1") is not None for s in opened)
        for store in opened:
            store.close()

    def test_data_survives_reopen(self, store: ResultStore, store_url: str) -> None:
        store.apply(update("t1", "e1", "completed", 1, result={"text": "héllo ✓"}))
        reopened = open_store(store_url)
        task = reopened.get("t1")
        reopened.close()
        assert task is not None and task.result == {"text": "héllo ✓"}


class TestSqliteMemoryStore(StoreContract):
    @pytest.fixture
    def store_url(self) -> str:
        return "sqlite:///:memory:"


class TestSqliteFileStore(SharedStoreContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/nested/results.db"  # absolute: four slashes


# --- SQLite and URL specifics ----------------------------------------------------------------


# A database of the global-id layout (before task ids were per tenant): its DDL differs per
# backend (`V1_SQLITE`, and `V1_POSTGRES` in tests/integration/test_store_postgres.py); its rows are
# the same statements on both. e1 and e2 share an event time: the migrated timeline keeps them in
# arrival order.
V1_SQLITE = (
    "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, status TEXT NOT NULL, "
    "created_at TEXT NOT NULL, updated_at TEXT NOT NULL, tenant TEXT, kind TEXT, stage TEXT, "
    "result TEXT, verdict TEXT, moderation TEXT, trace_id TEXT, error TEXT, callback_url TEXT, "
    "completed_at TEXT)",
    "CREATE INDEX tasks_status_idx ON tasks (status)",
    "CREATE TABLE task_events (event_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, "
    "type TEXT NOT NULL, status TEXT NOT NULL, time TEXT NOT NULL, stage TEXT, detail TEXT)",
    "CREATE INDEX task_events_task_time_idx ON task_events (task_id, time)",
    "CREATE TABLE notifications (task_id TEXT PRIMARY KEY, event_id TEXT NOT NULL, "
    "status TEXT NOT NULL, url TEXT NOT NULL, claimed_at TEXT NOT NULL, http_status INTEGER, "
    "delivered_at TEXT)",
)
V1_ROWS = (
    "INSERT INTO tasks VALUES ('t1', 'completed', '2024-05-01T12:00:00.000000+00:00', "
    "'2024-05-01T12:00:05.000000+00:00', 'acme', 'embed', 'writeback', '{\"x\":1}', NULL, NULL, "
    "NULL, NULL, 'https://cb', '2024-05-01T12:00:05.000000+00:00')",
    "INSERT INTO tasks (task_id, status, created_at, updated_at) VALUES ('t2', 'processing', "
    "'2024-05-01T12:00:00.000000+00:00', '2024-05-01T12:00:00.000000+00:00')",
    "INSERT INTO task_events (event_id, task_id, type, status, time) VALUES "
    "('e1', 't1', 'x', 'processing', '2024-05-01T12:00:05.000000+00:00')",
    "INSERT INTO task_events (event_id, task_id, type, status, time) VALUES "
    "('e2', 't1', 'x', 'completed', '2024-05-01T12:00:05.000000+00:00')",
    "INSERT INTO task_events (event_id, task_id, type, status, time) VALUES "
    "('e3', 't2', 'x', 'processing', '2024-05-01T12:00:00.000000+00:00')",
    "INSERT INTO notifications VALUES ('t1', 'e2', 'delivered', 'https://cb', "
    "'2024-05-01T12:00:06.000000+00:00', 204, '2024-05-01T12:00:07.000000+00:00')",
)


class MigrationContract:
    """The in-place migration from the global-id layout (`conveyor.store.schema`, written once):
    subclasses provide `v1_url`, a database holding `V1_ROWS` in the old layout."""

    def test_database_of_the_global_id_layout_is_migrated(self, v1_url: str) -> None:
        # Rows keep their data under their tenant, and a second open finds the new layout.
        store = open_store(v1_url)
        try:
            t1 = store.get("t1", tenant="acme")
            assert t1 is not None and (t1.status, t1.result, t1.callback_url) == (
                "completed",
                {"x": 1},
                "https://cb",
            )
            assert [e.event_id for e in store.timeline("t1", tenant="acme")] == ["e1", "e2"]
            t2 = store.get("t2")
            assert t2 is not None and t2.tenant is None and store.get("t2", tenant="") == t2
            notice = store.notification("t1", tenant="acme")
            assert notice is not None and (notice.status, notice.tenant) == ("delivered", "acme")
            assert store.reserve("t1", "globex", time=at(9), digest="d").new  # a separate task
            assert store.apply(update("t1", "e2", "completed", 5)) is False  # old ids dedupe
        finally:
            store.close()
        open_store(v1_url).close()
        dialect = open_dialect(v1_url)
        try:
            with dialect.read() as cur:
                assert all(dialect.columns(cur, t) for t in _V1_TABLES)
                assert "digest" in dialect.columns(cur, "tasks")
                assert all(not dialect.columns(cur, f"{t}_v1") for t in _V1_TABLES)
        finally:
            dialect.close()


_V1_TABLES = ("tasks", "task_events", "notifications")


class TestSqliteMigration(MigrationContract):
    @pytest.fixture
    def v1_url(self, tmp_path: Path) -> str:
        with sqlite3.connect(tmp_path / "old.db") as conn:
            for statement in (*V1_SQLITE, *V1_ROWS):
                conn.execute(statement)
        return f"sqlite:///{tmp_path}/old.db"


def test_sqlite_file_uses_wal(tmp_path: Path) -> None:
    open_store(f"sqlite:///{tmp_path}/r.db").close()
    with sqlite3.connect(tmp_path / "r.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_locked_database_raises_retryable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 50)
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    blocker = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(RetryableError, match="locked"):
            store.apply(update("t1", "e1", "pending", 0))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.apply(update("t1", "e1", "pending", 0)) is True
    store.close()


def test_relative_sqlite_url_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    open_store("sqlite:///var/results.db").close()
    assert (tmp_path / "var" / "results.db").is_file()


def test_unreachable_postgres_raises_retryable() -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RetryableError):
        open_store(f"postgresql://postgres@127.0.0.1:{port}/x?connect_timeout=2")


def test_unknown_scheme_is_rejected() -> None:
    with pytest.raises(ValueError, match="mysql"):
        open_store("mysql://db/x")
