"""Fair share on the real broker: a tenant's late tasks are served before another tenant's
backlog drains, and the backlog still completes; with fair share off they wait behind it."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from conveyor.events.avro import default_schemas, schema_urn
from conveyor.events.codec import encode_binary
from conveyor.events.model import Event, event_id
from conveyor.runtime.handler import StageContext, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.support import apply, produce_raw

PREPROCESSED = "conveyor.task.preprocessed.v1"
BACKLOG, LATE = 400, 20


def embed_record(task_id: str, tenant: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    task: dict[str, Any] = {
        "task_id": task_id,
        "tenant": tenant,
        "kind": "embed",
        "priority": "normal",
        "callback_url": None,
        "deadline": None,
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
        extensions={"tenant": tenant, "priority": "normal"},
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
