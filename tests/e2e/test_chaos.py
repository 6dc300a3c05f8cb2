"""Chaos: kill -9 random service processes and restart the broker while 2,000 tasks flow.

Nothing may be lost or duplicated: afterwards the store has exactly 2,000 tasks, each completed
or dead-lettered (failed), no task has two rows or two timeline entries for one event, and the
webhook receiver, honouring `webhook-id`, acted on exactly one webhook per task. An HTTP call
can't be made exactly-once across a crash: a notify killed between the receiver's answer and
the claim's completion sends that webhook again, same id and body (freshly timestamped and
signed), so raw repeats are allowed only up to what notify kills interrupted in flight, and
each must repeat the first's body exactly. The same run in exactly-once mode also shows no
duplicate event on any stage output topic. Loops are bounded in count and time.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.broker.local import LocalBroker
from conveyor.client import TaskClient
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.stack import LocalStack
from conveyor.settings import KafkaSettings
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV
from tests.support import headers_of, read_topics

pytestmark = [pytest.mark.broker, pytest.mark.models]

TASKS = 2000
# Every kill happens while tasks are still in flight (the loop stops when all are done).
MIN_KILLS = 10
# Webhooks notify sends at once: what one kill -9 of notify can interrupt, so may repeat.
WEBHOOK_CONCURRENCY = 4
CHAOS_BUDGET_S = 90.0  # the kill loop stops after this, whatever happened
FINISH_BUDGET_S = 300.0
OUTPUT_TOPICS = [
    "conveyor.task.preprocessed.normal",
    "conveyor.task.inferred",
    "conveyor.task.moderated",
    "conveyor.task.stored",
    "conveyor.task.notified",
]


def chaos(
    stack: LocalStack, broker: LocalBroker, rng: random.Random, done: Callable[[], int]
) -> tuple[collections.Counter[str], int]:
    """Kill a random service every 1-2.5 s (restarted at once) while tasks are in flight;
    restart the broker once. Returns (kills per service while tasks were in flight, broker
    restarts)."""
    kills: collections.Counter[str] = collections.Counter()
    broker_restarts = 0
    deadline = time.monotonic() + CHAOS_BUDGET_S
    while time.monotonic() < deadline and kills.total() < MIN_KILLS + 2 and done() < TASKS:
        stack.wait(rng.uniform(1.0, 2.5))  # also restarts whatever died
        name = rng.choice(list(stack.procs))
        stack.procs[name].kill()
        kills[name] += 1
        stack.supervise()
        if kills.total() == MIN_KILLS // 2:
            broker.restart(hard=True)
            broker_restarts += 1
    return kills, broker_restarts


def terminal(counts: dict[str, int]) -> int:
    return sum(counts[s] for s in ("completed", "blocked", "failed", "expired"))


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_kill_nine_and_broker_restart_lose_and_duplicate_nothing(
    exactly_once: bool,
    kafka_broker: LocalBroker,
    topic_prefix: str,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'chaos.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        **WEBHOOK_ENV,
        "CONVEYOR_RETRY_DELAYS": "[1, 2, 4]",
        "CONVEYOR_CLAIM_LEASE_S": "5",
        "CONVEYOR_WEBHOOK_CONCURRENCY": str(WEBHOOK_CONCURRENCY),
        "CONVEYOR_EXACTLY_ONCE": str(exactly_once).lower(),
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
        "CONVEYOR_PRELOAD": "true",
    }
    stack = LocalStack(tmp_path, env)
    stack.apply_topics()
    stack.start()
    rng = random.Random(20261123)
    try:
        tasks = [
            {
                "task_id": f"chaos-{i:05d}",
                "tenant": "acme",
                "kind": "embed",
                "input": f"chaos sentence number {i} about kafka and retries",
                "callback_url": receiver.url,
            }
            for i in range(TASKS)
        ]
        TaskClient(
            KafkaSettings(kafka_bootstrap=kafka_broker.bootstrap, topic_prefix=topic_prefix)
        ).submit_many(tasks)
        store = open_store(store_url)
        kills, restarts = chaos(stack, kafka_broker, rng, lambda: terminal(store.count_by_status()))
        deadline = time.monotonic() + FINISH_BUDGET_S
        while time.monotonic() < deadline:
            stack.supervise()
            counts = store.count_by_status()
            if terminal(counts) >= TASKS and len({d.task_id for d in receiver.applied()}) >= TASKS:
                break
            time.sleep(1.0)
        time.sleep(3.0)  # let a duplicate, if any, arrive before counting
        counts = store.count_by_status()
        timelines = [store.timeline(t["task_id"]) for t in tasks[::50]]
        store.close()
    finally:
        stack.stop()
    logs = "\n".join(f"--- {p.label}\n{p.tail(10)}" for p in stack.procs.values())
    assert kills.total() >= MIN_KILLS and restarts == 1, kills
    assert sum(counts.values()) == TASKS, (counts, logs)
    assert counts["completed"] + counts["failed"] == TASKS, counts
    for timeline in timelines:
        ids = [e.event_id for e in timeline]
        assert len(ids) == len(set(ids))
    applied = receiver.applied()
    per_task = collections.Counter(d.task_id for d in applied)
    assert set(per_task) == {t["task_id"] for t in tasks}, (len(per_task), logs)
    duplicated = {t: n for t, n in per_task.items() if n > 1}
    assert not duplicated, duplicated  # one event id per task: its webhook acted on once
    deliveries = receiver.snapshot()
    first = {d.event_id: d for d in applied}
    # A repeat carries the first's body, byte for byte, under the same webhook id.
    assert all(d.raw == first[d.event_id].raw for d in deliveries)
    assert all(d.signature_ok for d in deliveries)
    repeats = len(deliveries) - len(applied)
    # Each kill can repeat at most the webhooks it interrupted in flight (answers are recorded
    # as they come, so finished ones are not repeated).
    assert repeats <= kills["notify"] * WEBHOOK_CONCURRENCY, (repeats, kills)
    if exactly_once:
        out = read_topics(
            kafka_broker.bootstrap,
            [topic_prefix + t for t in OUTPUT_TOPICS],
            expect=TASKS * len(OUTPUT_TOPICS),
            timeout_s=120,
            settle_s=2.0,
        )
        seen = collections.Counter((m.topic(), headers_of(m)["ce_id"]) for m in out)
        dup = [k for k, n in seen.items() if n > 1]
        assert not dup, dup[:5]
