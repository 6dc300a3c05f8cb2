"""Result reuse with every service a process, the real broker, real models and a real store.

1. 200 tasks of which 100 repeat an earlier task's input (same tenant, kind, params) run the
   models 100 times (`conveyor_model_records_total`), and every task ends `completed` with its
   own row, timeline and webhook, and the result of its own input: embeddings are checked against
   the embedding model run here, repeats against their originals (SQLite store).
2. Two inference replicas share the identical tasks in flight: 40 tasks of 8 inputs run the
   model 8 times across both (PostgreSQL store: claims serialise on its row locks).
The 1,000-task figure of the issue is bench/reuse.py.
"""

from __future__ import annotations

import collections
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from conveyor.client import TaskClient
from conveyor.local.process import ServiceProcess
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.samples import MINILM_ONLY, SENTENCES
from conveyor.local.stack import LocalStack
from conveyor.ml.registry import ModelRegistry
from conveyor.settings import KafkaSettings
from conveyor.store import ResultStore, TaskRecord, open_store
from conveyor.store.pgserver import PgServer
from tests.e2e.conftest import WEBHOOK_ENV
from tests.e2e.observability import samples

pytestmark = [pytest.mark.broker, pytest.mark.models]
LABELS = ["business", "weather", "culture", "infrastructure"]


def originals(run: str) -> list[dict[str, Any]]:
    """100 distinct tasks: 85 embed (5 of them the same text as another, for another tenant:
    keys are per tenant), 10 classify, 5 greedy generate."""
    tasks: list[dict[str, Any]] = []
    for i in range(80):
        text = f"{SENTENCES[i % len(SENTENCES)]} Item {i}."
        tasks.append({"tenant": "acme", "kind": "embed", "input": text})
    for i in range(5):
        tasks.append({"tenant": "globex", "kind": "embed", "input": tasks[i]["input"]})
    for i in range(10):
        text = f"{SENTENCES[i % len(SENTENCES)]} Case {i}."
        tasks.append({"tenant": "globex", "kind": "classify", "input": text, "labels": LABELS})
    for i in range(5):
        tasks.append(
            {
                "tenant": "acme",
                "kind": "generate",
                "input": f"Name a colour ({i}).",
                "params": {"max_new_tokens": 4},
            }
        )
    for n, task in enumerate(tasks):
        task["task_id"] = f"{run}-orig-{n:03d}"
    return tasks


def repeat(task: dict[str, Any], n: int, run: str) -> dict[str, Any]:
    # The same input spelled differently where normalisation makes it equal.
    again = {**task, "task_id": f"{run}-again-{n:03d}"}
    if again["kind"] == "embed" and n % 2:
        again["input"] = "  " + task["input"].replace(" ", "  ") + "\n"
    return again


def wait_done(stack: LocalStack, store: ResultStore, n: int, hooks: WebhookReceiver | None) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        counts = store.count_by_status()
        done = sum(counts[s] for s in ("completed", "blocked", "failed", "expired"))
        if done >= n and (hooks is None or len(hooks.snapshot()) >= n):
            time.sleep(2.0)  # let any duplicate delivery arrive before counting
            return
        assert not stack.supervise(), "a service died:\n" + "\n".join(
            p.tail() for p in stack.procs.values()
        )
        time.sleep(0.5)
    raise AssertionError(f"not done in time: {store.count_by_status()}")


def total(metrics: str, name: str, **labels: str) -> float:
    return sum(samples(metrics, name, **labels))


def both_assigned(bootstrap: str, group: str, lanes: str, timeout_s: float = 120) -> None:
    """Wait until two members of `group` each own a partition of a topic starting with `lanes`
    (ready is not joined; cooperative-sticky balances all topics together, not each lane)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    owners, seen = 0, ""
    while time.monotonic() < deadline:
        try:
            found = admin.describe_consumer_groups([group])[group].result(timeout=10)
        except KafkaException:
            found = None
        if found is not None:
            owners = sum(
                any(tp.topic.startswith(lanes) for tp in m.assignment.topic_partitions)
                for m in found.members
            )
            seen = "; ".join(
                ",".join(f"{tp.topic}:{tp.partition}" for tp in m.assignment.topic_partitions)
                for m in found.members
            )
            if owners >= 2:
                return
        time.sleep(0.5)
    raise AssertionError(f"{owners} inference replicas own a partition of {lanes}*: {seen}")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_200_tasks_with_100_repeats_run_the_models_100_times(
    kafka_bootstrap: str, topic_prefix: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        "CONVEYOR_REUSE": "true",
        "CONVEYOR_RETRY_DELAYS": "[1, 2, 4]",
        "OTEL_SDK_DISABLED": "true",
        **WEBHOOK_ENV,
    }
    run = topic_prefix.strip(".")
    first = originals(run)
    again = [repeat(t, n, run) for n, t in enumerate(first)]
    for task in first + again:
        task["callback_url"] = receiver.url
    stack = LocalStack(tmp_path, env)
    stack.apply_topics()
    stack.start()
    try:
        client = TaskClient(
            KafkaSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix),
            source="/tests/e2e/reuse",
        )
        client.submit_many(first + again)  # repeats may share a batch with their original
        store = open_store(store_url)
        wait_done(stack, store, 200, receiver)
        records = {t["task_id"]: store.get(t["task_id"], tenant=t["tenant"]) for t in first + again}
        timelines = {
            t["task_id"]: store.timeline(t["task_id"], tenant=t["tenant"]) for t in first + again
        }
        store.close()
        metrics = stack.procs["inference"].metrics()
    finally:
        stack.stop()

    assert total(metrics, "conveyor_model_records_total") == 100
    assert total(metrics, "conveyor_reuse_lookups_total", outcome="miss") == 100
    reused = total(metrics, "conveyor_reuse_lookups_total", outcome="hit") + total(
        metrics, "conveyor_reuse_lookups_total", outcome="coalesced"
    )
    assert reused == 100
    done: dict[str, TaskRecord] = {}
    for task_id, record in records.items():
        assert record is not None and record.status == "completed", (task_id, record)
        assert record.task_id == task_id and record.result is not None
        done[task_id] = record
    for orig, rep in zip(first, again, strict=True):
        a, b = done[orig["task_id"]], done[rep["task_id"]]
        assert a.result == b.result, (orig, rep)
        assert a.tenant == b.tenant == orig["tenant"]
    # Exactly one of each pair says, in its timeline, that its result was reused.
    said = [
        task_id
        for task_id, events in timelines.items()
        if any("result reused from identical task" in (e.detail or "") for e in events)
    ]
    assert len(said) == 100
    # Each task's own webhook, signed, with its own id and result.
    deliveries = receiver.snapshot()
    per_task = collections.Counter(d.task_id for d in deliveries)
    assert set(per_task) == set(done) and set(per_task.values()) == {1}
    assert all(d.signature_ok and d.body["status"] == "completed" for d in deliveries)
    # The right result: each embedding is its own input's (the model run here), and the
    # cross-tenant twins agree too although they ran separately.
    embeds = [t for t in first + again if t["kind"] == "embed"]
    model = ModelRegistry.from_json(None).for_kind("embed")
    truth = dict(
        zip(
            [t["input"].strip() for t in first if t["kind"] == "embed"],
            model.embed([t["input"] for t in first if t["kind"] == "embed"]),
            strict=True,
        )
    )
    for t in embeds:
        vector = done[t["task_id"]].result["embedding"]  # type: ignore[index]
        expected = truth[" ".join(t["input"].split())]
        assert cosine(vector, expected) > 0.999, t["task_id"]
    distinct = {json.dumps(done[t["task_id"]].result) for t in first[:80]}
    assert len(distinct) == 80  # no result went to another input's task
    labels = [done[t["task_id"]].result["label"] for t in first if t["kind"] == "classify"]  # type: ignore[index]
    assert all(label in LABELS for label in labels)


def test_identical_tasks_in_flight_on_two_inference_replicas_run_once(
    kafka_bootstrap: str, topic_prefix: str, pg_server: PgServer, tmp_path: Path
) -> None:
    store_url = pg_server.create_database(f"reuse_{topic_prefix.strip('.')}")
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        "CONVEYOR_REUSE": "true",
        "CONVEYOR_MODELS": MINILM_ONLY,
        # One rung: the cooperative-sticky assignor balances partitions over all of a group's
        # topics, and with three rungs it may give one replica every retry partition and the
        # other every lane partition. A waiter retried after 20 s finds the result, or runs:
        # long enough for the first copy's model call on a loaded machine.
        "CONVEYOR_RETRY_DELAYS": "[20]",
        "OTEL_SDK_DISABLED": "true",
    }
    stack = LocalStack(
        tmp_path, env, services=("preprocess", "inference", "moderation", "writeback")
    )
    second = ServiceProcess("inference", env, tmp_path, index=1)
    stack.procs["inference-1"] = second
    stack.apply_topics()
    stack.start()
    try:
        lanes = f"{topic_prefix}conveyor.task.preprocessed."
        both_assigned(kafka_bootstrap, f"{topic_prefix}conveyor.inference", lanes)
        run = topic_prefix.strip(".")
        tasks = [
            {
                "task_id": f"{run}-{copy}-{i}",
                "tenant": "acme",
                "kind": "embed",
                "input": f"{SENTENCES[i % len(SENTENCES)]} In flight {i}.",
                "priority": ("high", "normal", "low")[copy % 3],  # spread over every lane
            }
            for copy in range(5)
            for i in range(8)
        ]
        TaskClient(
            KafkaSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix),
            source="/tests/e2e/reuse",
        ).submit_many(tasks)
        store = open_store(store_url)
        wait_done(stack, store, 40, None)
        records = {t["task_id"]: store.get(t["task_id"], tenant="acme") for t in tasks}
        store.close()
        metrics = [stack.procs[name].metrics() for name in ("inference", "inference-1")]
    finally:
        stack.stop()
    consumed = [total(m, "conveyor_events_consumed_total", stage="inference") for m in metrics]
    assert all(c > 0 for c in consumed), f"one replica took every record: {consumed}"
    assert sum(total(m, "conveyor_model_records_total") for m in metrics) == 8
    assert all(r is not None and r.status == "completed" for r in records.values()), records
    by_input: dict[str, set[str]] = collections.defaultdict(set)
    for t in tasks:
        by_input[t["input"]].add(json.dumps(records[t["task_id"]].result))  # type: ignore[union-attr]
    assert len(by_input) == 8 and all(len(results) == 1 for results in by_input.values())
    waits = sum(total(m, "conveyor_reuse_lookups_total", outcome="wait") for m in metrics)
    print(f"replicas consumed {consumed}; waits for an identical task in flight: {waits}")
