"""Fair share on the real broker: a tenant's late tasks are served before another tenant's
backlog drains, and the backlog still completes; with fair share off they wait behind it."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.events.avro import default_schemas, schema_urn
from conveyor.events.codec import encode_binary
from conveyor.events.model import Event, event_id
from conveyor.runtime.handler import StageContext, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.support import apply, headers_of, produce_raw, read_topics

PREPROCESSED = "conveyor.task.preprocessed.v1"
BACKLOG, LATE = 400, 20


def embed_record(
    task_id: str, tenant: str, *, deadline: str | None = None
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    task: dict[str, Any] = {
        "task_id": task_id,
        "tenant": tenant,
        "kind": "embed",
        "priority": "normal",
        "callback_url": None,
        "deadline": deadline,
        "submitted_at": "2026-12-02T00:00:00Z",
        "model": None,
        "params": {},
    }
    data = {"task": task, "input": "x", "prompt": "x", "token_count": 1, "labels": []}
    event = Event(
        id=event_id(task_id, PREPROCESSED),
        type=PREPROCESSED,
        source="/conveyor/preprocess",
        subject=task_id,
        data=data,
        dataschema=schema_urn("task-preprocessed", 1),
        time="2026-12-02T00:00:00Z",
        extensions={"tenant": tenant, "priority": "normal"}
        | ({"deadline": deadline} if deadline else {}),
    )
    headers, value = encode_binary(event, default_schemas())
    return task_id.encode(), value, headers


def run_stage(
    bootstrap: str, prefix: str, seen: list[str], fair: bool, gate: threading.Event
) -> StageRunner:
    def embed(event: Event, _ctx: StageContext[Any]) -> None:
        if len(seen) >= 16:
            gate.wait(60)  # the model is busy until the late tasks have been read
        time.sleep(0.003)  # a fixed cost per task, so a backlog builds up
        seen.append(event.data["task"]["tenant"])

    service = StageService("inference", StageSettings, handle=embed, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        batch_max=8,
        priority_lanes=True,
        pipelined=True,
        max_in_flight=16,
        fair_share=fair,
        fair_window=2000,
    )
    runner = StageRunner(service, settings)
    threading.Thread(target=runner.run, daemon=True).start()
    return runner


def backlog_then_late(bootstrap: str, prefix: str, fair: bool) -> tuple[list[str], int]:
    """Tenant a's backlog, then tenant b's few once the stage is busy; returns the order
    served and where in it b's tasks arrived."""
    apply(bootstrap, prefix)
    lane = prefix + "conveyor.task.preprocessed.normal"
    produce_raw(bootstrap, lane, [embed_record(f"a{i}", "a") for i in range(BACKLOG)])
    seen: list[str] = []
    gate = threading.Event()
    runner = run_stage(bootstrap, prefix, seen, fair, gate)
    try:
        deadline = time.monotonic() + 90
        while len(seen) < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        arrived = len(seen)
        produce_raw(bootstrap, lane, [embed_record(f"b{i}", "b") for i in range(LATE)])
        # With fair share, the model resumes once everything is in the read-ahead window.
        fair_share = runner._fair
        while fair_share is not None and fair_share.outstanding < BACKLOG + LATE - arrived:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        gate.set()
        while len(seen) < BACKLOG + LATE and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    return seen, arrived


def test_a_late_tenant_is_served_before_a_backlog_drains(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    seen, arrived = backlog_then_late(kafka_bootstrap, topic_prefix, fair=True)
    assert seen.count("a") == BACKLOG and seen.count("b") == LATE  # everything completes
    last_b = max(i for i, tenant in enumerate(seen) if tenant == "b")
    a_before_last_b = seen[:last_b].count("a")
    # b's 20 tasks were served alternating with a's (plus what was already in the pipeline),
    # long before a's backlog of 400 drained.
    print(f"fair share: b arrived after {arrived}, last b after {a_before_last_b} of a")
    assert a_before_last_b - arrived < 120, (arrived, a_before_last_b)
    assert BACKLOG - a_before_last_b > 150


def test_without_fair_share_a_late_tenant_waits_behind_the_backlog(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    seen, arrived = backlog_then_late(kafka_bootstrap, topic_prefix, fair=False)
    assert seen.count("a") == BACKLOG and seen.count("b") == LATE
    last_b = max(i for i, tenant in enumerate(seen) if tenant == "b")
    # Partition order: b's tasks sit behind a's in every partition, so the last of them
    # waits for (nearly) the whole backlog.
    assert seen[:last_b].count("a") > BACKLOG * 3 // 4, (arrived, seen[:last_b].count("a"))


def test_tasks_straight_to_kafka_over_a_tenants_rate_all_complete_paced(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    count, rate, burst = 100, 40.0, 10
    monkeypatch.setenv("CONVEYOR_TENANT_QUOTAS", json.dumps({"a": {"rate": rate, "burst": burst}}))
    apply(kafka_bootstrap, topic_prefix)
    lane = topic_prefix + "conveyor.task.preprocessed.normal"
    produce_raw(kafka_bootstrap, lane, [embed_record(f"a{i}", "a") for i in range(count)])
    done: dict[str, float] = {}

    def embed(event: Event, _ctx: StageContext[Any]) -> None:
        done.setdefault(event.data["task"]["task_id"], time.monotonic())

    service = StageService("inference", StageSettings, handle=embed, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        batch_max=8,
        pipelined=True,
        fair_share=True,
        quota_hold=True,
    )
    runner = StageRunner(service, settings)
    threading.Thread(target=runner.run, daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while len(done) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    assert sorted(done) == sorted(f"a{i}" for i in range(count))  # all of them, none lost
    # Paced: beyond the burst, no faster than the rate (a lower bound: slowness cannot fail it).
    span = max(done.values()) - min(done.values())
    assert span >= (count - burst - 1) / rate, span


def test_held_tasks_that_cannot_start_before_their_deadline_fail_with_reason_quota(
    kafka_bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    count, rate, burst = 16, 4.0, 2
    monkeypatch.setenv("CONVEYOR_TENANT_QUOTAS", json.dumps({"a": {"rate": rate, "burst": burst}}))
    apply(kafka_bootstrap, topic_prefix)
    lane = topic_prefix + "conveyor.task.preprocessed.normal"
    # At 4/s after a burst of 2, the 16th task could start 3.5 s after the first: with a
    # deadline 1.5 s ahead, the later ones cannot, and are failed instead of left to expire.
    deadline = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    produce_raw(
        kafka_bootstrap,
        lane,
        [embed_record(f"a{i}", "a", deadline=deadline) for i in range(count)],
    )
    ran: list[str] = []

    def embed(event: Event, _ctx: StageContext[Any]) -> None:
        ran.append(event.data["task"]["task_id"])

    service = StageService("inference", StageSettings, handle=embed, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        batch_max=8,
        pipelined=True,
        fair_share=True,
        quota_hold=True,
    )
    runner = StageRunner(service, settings)
    threading.Thread(target=runner.run, daemon=True).start()
    dlq = topic_prefix + "conveyor.inference.dlq"
    status = topic_prefix + "conveyor.task.status"
    try:
        dead = read_topics(kafka_bootstrap, [dlq], expect=count - burst, timeout_s=60, settle_s=1)
        statuses = read_topics(kafka_bootstrap, [status], expect=len(dead), timeout_s=30)
    finally:
        runner.stop()
    refused = sorted(headers_of(m)["ce_subject"] for m in dead)
    assert dead and all(headers_of(m)["conveyor_error_class"] == "QuotaError" for m in dead)
    assert len(ran) >= burst  # the burst started at once
    # Every task either ran or was refused, exactly once: none lost, none both.
    assert sorted(ran + refused) == sorted(f"a{i}" for i in range(count))
    assert all(b"quota" in (m.value() or b"") for m in statuses), statuses
