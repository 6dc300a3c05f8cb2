"""The `variant_runs` table's contract, for every backend (PostgreSQL in tests/integration)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.store import ResultStore, open_store
from conveyor.store.variantruns import VariantRun

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def run(task_id: str, variant: str, status: str, **over: Any) -> VariantRun:
    fields: dict[str, Any] = {"tenant": "acme", "shadow": False, "kind": "embed", **over}
    return VariantRun(task_id=task_id, variant=variant, status=status, **fields)


class VariantRunContract:
    @pytest.fixture
    def store(self, store_url: str) -> Iterator[ResultStore]:
        opened = open_store(store_url)
        yield opened
        opened.close()

    def test_finished_status_is_kept_and_no_value_is_erased(self, store: ResultStore) -> None:
        done = T0 + timedelta(seconds=2)
        store.record_variant_runs([run("t", "a", "completed", verdict="allow", finished_at=done)])
        store.record_variant_runs([run("t", "a", "running", inference_ms=4.0, submitted_at=T0)])
        (merged,) = store.variant_runs()
        assert (merged.status, merged.verdict, merged.inference_ms) == ("completed", "allow", 4.0)
        assert merged.submitted_at == T0 and merged.finished_at == done

    def test_blocked_output_is_withheld_and_a_failure_keeps_its_error(
        self, store: ResultStore
    ) -> None:
        store.record_variant_runs([run("t", "a", "running", result={"embedding": [0.5]})])
        assert store.variant_runs()[0].result == {"embedding": [0.5]}
        store.record_variant_runs([run("t", "a", "blocked", verdict="block")])
        assert store.variant_runs()[0].result is None
        store.record_variant_runs([run("u", "a", "failed", error="boom")])
        store.record_variant_runs([run("u", "a", "running", inference_ms=1.0)])
        failed = next(r for r in store.variant_runs() if r.task_id == "u")
        assert (failed.status, failed.error) == ("failed", "boom")

    def test_runs_are_keyed_by_tenant_task_and_variant_and_filtered_by_kind(
        self, store: ResultStore
    ) -> None:
        store.record_variant_runs(
            [
                run("t", "a", "completed"),
                run("t", "s", "completed", shadow=True, result={"label": "x"}),
                run("t", "a", "completed", tenant="globex"),
                run("t", "m", "completed", kind="classify", tenant=None),
            ]
        )
        runs = store.variant_runs(kind="embed")
        assert sorted((r.tenant, r.variant, r.shadow) for r in runs) == [
            ("acme", "a", False),
            ("acme", "s", True),
            ("globex", "a", False),
        ]
        (classify,) = store.variant_runs(kind="classify")
        assert classify.tenant is None and len(store.variant_runs()) == 4


class TestSqliteMemory(VariantRunContract):
    @pytest.fixture
    def store_url(self) -> str:
        return "sqlite:///:memory:"


class TestSqliteFile(VariantRunContract):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/results.db"
