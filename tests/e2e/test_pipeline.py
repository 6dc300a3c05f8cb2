"""All five services as separate processes against the real broker, real models, real store."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from conveyor.client import TaskClient
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.samples import PROFANE, SENTENCES
from conveyor.local.stack import LocalStack
from conveyor.settings import KafkaSettings
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV

pytestmark = [pytest.mark.broker, pytest.mark.models]


def mixed_tasks(run: str, callback: str) -> tuple[list[dict[str, object]], dict[str, str]]:
    """200 tasks: embed, classify, generate, some to be blocked, some invalid; expected status."""
    tasks: list[dict[str, object]] = []
    expect: dict[str, str] = {}

    def add(kind: str, text: str, status: str, **extra: object) -> None:
        task_id = f"{run}-{len(tasks):03d}"
        tasks.append(
            {
                "task_id": task_id,
                "tenant": ["acme", "globex"][len(tasks) % 2],
                "kind": kind,
                "input": text,
                "callback_url": callback,
                **extra,
            }
        )
        expect[task_id] = status

    for i in range(140):
        add(
            "embed",
            f"{SENTENCES[i % len(SENTENCES)]} (item {i})",
            "completed",
            priority=["high", "normal", "low"][i % 3],
        )
    for i in range(20):
        add(
            "classify",
            SENTENCES[i % len(SENTENCES)],
            "completed",
            labels=["business", "weather", "culture", "infrastructure"],
        )
    for i in range(16):
        add(
            "generate",
            f"Name a colour of the rainbow. ({i})",
            "completed",
            params={"max_new_tokens": 6},
        )
    for i in range(12):
        add("embed", PROFANE[i % len(PROFANE)], "blocked")
    for _ in range(12):
        add("embed", "   \n  ", "failed")  # empty after normalisation: rejected by preprocess
    return tasks, expect


def test_two_hundred_mixed_tasks_end_exactly_once_in_store_and_webhooks(
    kafka_bootstrap: str,
    topic_prefix: str,
    store_url: str,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        **WEBHOOK_ENV,
        "CONVEYOR_RETRY_DELAYS": "[1, 2, 4]",
        "OTEL_SDK_DISABLED": "true",
    }
    stack = LocalStack(tmp_path, env)
    stack.apply_topics()
    stack.start()
    try:
        tasks, expect = mixed_tasks(topic_prefix.strip("."), receiver.url)
        TaskClient(
            KafkaSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix),
            source="/tests/e2e",
        ).submit_many(tasks)
        store = open_store(store_url)
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            counts = store.count_by_status()
            done = sum(counts[s] for s in ("completed", "blocked", "failed", "expired"))
            if done >= 200 and len(receiver.snapshot()) >= 200:
                break
            assert not stack.supervise(), "a service died:\n" + "\n".join(
                p.tail() for p in stack.procs.values()
            )
            time.sleep(0.5)
        time.sleep(2.0)  # let any duplicate delivery arrive before counting
        records = {task_id: store.get(task_id) for task_id in expect}
        counts = store.count_by_status()
        store.close()
    finally:
        stack.stop()
    logs = "\n".join(f"--- {p.label}\n{p.tail(15)}" for p in stack.procs.values())
    assert sum(counts.values()) == 200, (counts, logs)
    wrong = {
        t: (r.status if r else None, s)
        for t, s in expect.items()
        if (r := records[t]) is None or r.status != s
    }
    assert not wrong, (wrong, logs)
    trace_ids = set()
    for task_id, status in expect.items():
        record = records[task_id]
        assert record is not None
        # Tracing export is off here, yet every task carries its own trace id end to end.
        assert record.trace_id is not None and len(record.trace_id) == 32, record
        trace_ids.add(record.trace_id)
        if status == "blocked":
            assert record.result is None and record.verdict == "block"
        if status == "failed":
            assert "empty" in (record.error or "")
        if status == "completed":
            assert record.result is not None and record.verdict in ("allow", "flag")
    assert len(trace_ids) == 200
    deliveries = receiver.snapshot()
    per_task = collections.Counter(d.task_id for d in deliveries)
    assert len(deliveries) == 200 and set(per_task) == set(expect), per_task.most_common(3)
    assert all(d.signature_ok for d in deliveries)
    for d in deliveries:
        assert d.body["status"] == expect[d.task_id]
        # Tracing is off, yet the webhook carries the task's own trace context.
        assert d.headers["traceparent"].split("-")[1] == records[d.task_id].trace_id
    embeds = [
        records[t].result["embedding"]
        for t, s in expect.items()
        if s == "completed" and "embedding" in (records[t].result or {})
    ]
    assert embeds and all(len(v) == 384 for v in embeds)
