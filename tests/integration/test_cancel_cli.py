"""`conveyor cancel` as a process against the real broker and a store file: tenant scoping,
idempotency, the no-op after completion, and what it publishes (issue 11, cancellation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conveyor.cancel import CANCEL_TOPIC, cancel_key
from conveyor.events.catalog import STATUS_TOPIC
from conveyor.store import TaskUpdate, open_store
from tests.support import apply, read_topics

pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]
T0 = datetime.now(UTC) - timedelta(minutes=5)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli.main", "cancel", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _seen(url: str, task_id: str, tenant: str, status: str = "processing") -> None:
    store = open_store(url)
    try:
        store.apply(
            TaskUpdate(
                task_id=task_id,
                event_id=f"{tenant}-{task_id}-{status}",
                event_type="conveyor.task.test.v1",
                status=status,
                time=T0 if status == "processing" else T0 + timedelta(seconds=1),
                tenant=tenant,
                kind="embed",
            )
        )
    finally:
        store.close()


def test_conveyor_cancel_is_tenant_scoped_idempotent_and_a_no_op_after_completion(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": url,
        "OTEL_SDK_DISABLED": "true",
    }
    _seen(url, "run-1", "acme")
    _seen(url, "shared", "acme")
    _seen(url, "shared", "beta")
    _seen(url, "done-1", "acme")
    _seen(url, "done-1", "acme", "completed")

    first = _cli(env, "run-1", "--json")
    assert first.returncode == 0, first.stderr
    view = json.loads(first.stdout)
    assert (view["cancelled"], view["status"], view["tenant"]) == (True, "cancelled", "acme")
    again = _cli(env, "run-1", "--tenant", "acme", "--json")
    assert again.returncode == 0 and json.loads(again.stdout) == view

    assert _cli(env, "run-1", "--tenant", "beta").returncode == 1  # not beta's task
    assert _cli(env, "nope").returncode == 1
    assert _cli(env, "shared").returncode == 2  # two tenants use the id: name one
    finished = _cli(env, "done-1")
    assert finished.returncode == 3 and "already completed" in finished.stdout

    cancels = read_topics(kafka_bootstrap, [topic_prefix + CANCEL_TOPIC], expect=2, settle_s=1.0)
    assert [m.key() for m in cancels] == [cancel_key("acme", "run-1")] * 2
    statuses = read_topics(kafka_bootstrap, [topic_prefix + STATUS_TOPIC], expect=2, settle_s=1.0)
    assert len({dict(m.headers() or [])["ce_id"] for m in statuses}) == 1  # one event, twice
    store = open_store(url)
    try:
        row = store.get("done-1", tenant="acme")
        assert row is not None and row.status == "completed"
        entries = [e.status for e in store.timeline("run-1", tenant="acme")]
        assert entries == ["processing", "cancelled"]
    finally:
        store.close()
