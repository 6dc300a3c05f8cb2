"""Fair share: tenant B's p95 completion time behind tenant A's backlog, against idle.

Starts its own LocalBroker and runs the inference stage's runtime (pipelined, priority lanes,
fair share on or off) in this process, with a fixed-cost stand-in for the embed model
(`--cost-ms` per record, one call per batch) so the figures measure scheduling, not the model.
Three runs per round (`--rounds`, interleaved), each on fresh topics:

- `idle`: B submits `--late` tasks to an idle stage;
- `fair`: A submits `--backlog` tasks, the stage starts on them, then B submits `--late`;
- `fifo`: the same with fair share off (partition order).

A task's completion time runs from the moment its tenant's submission began (the produce of its
first task) to the moment the stand-in model returned it. Target (issue 11): B's p95 under
`fair` within 3x its p95 under `idle`; every task of A completes.
Writes bench/results/fairshare.json.

    python bench/fairshare.py [--backlog 3000] [--late 30] [--cost-ms 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.events.avro import default_schemas, schema_urn  # noqa: E402
from conveyor.events.codec import encode_binary  # noqa: E402
from conveyor.events.model import Event, event_id  # noqa: E402
from conveyor.runtime.handler import BatchOutcome, StageContext, StageService  # noqa: E402
from conveyor.runtime.stage import StageRunner  # noqa: E402
from conveyor.settings import KafkaSettings, StageSettings  # noqa: E402
from conveyor.topology import apply_topics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fairshare.json"
PREPROCESSED = "conveyor.task.preprocessed.v1"
RUN_TIMEOUT_S = 300.0


def record(task_id: str, tenant: str) -> tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]:
    task: dict[str, Any] = {
        "task_id": task_id,
        "tenant": tenant,
        "kind": "embed",
        "priority": "normal",
        "callback_url": None,
        "deadline": None,
        "submitted_at": datetime.now(UTC).isoformat(),
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
        time=datetime.now(UTC).isoformat(),
        extensions={"tenant": tenant, "priority": "normal"},
    )
    headers, value = encode_binary(event, default_schemas())
    return task_id.encode(), value, list(headers)


def submit(bootstrap: str, topic: str, tenant: str, count: int, sent: dict[str, float]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    producer.list_topics(topic, timeout=30)  # connected, metadata known: not counted below
    # From the start of the submission: on a loaded machine a task can be run before the
    # producer's flush of the whole batch returns.
    now = time.monotonic()
    for i in range(count):
        key, value, headers = record(f"{tenant}{i}", tenant)
        producer.produce(topic, value, key, headers=list(headers))
        sent[f"{tenant}{i}"] = now
    producer.flush(60)


def one_run(bootstrap: str, backlog: int, late: int, fair: bool, cost_s: float) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:8]}."
    apply_topics(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    topic = prefix + "conveyor.task.preprocessed.normal"
    sent: dict[str, float] = {}
    done: dict[str, float] = {}

    def model(events: Sequence[Event], _ctx: StageContext[Any]) -> list[BatchOutcome]:
        time.sleep(cost_s * len(events))  # the stand-in embed model: a fixed cost per record
        now = time.monotonic()
        for event in events:
            done[event.data["task"]["task_id"]] = now
        return [None] * len(events)

    service = StageService("inference", StageSettings, handle_batch=model, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        batch_max=32,
        batch_wait_ms=20,
        priority_lanes=True,
        pipelined=True,
        max_in_flight=64,
        fair_share=fair,
    )
    runner = StageRunner(service, settings)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    # Warm up (group join, first fetch) with one task, so no run counts the stage's start.
    submit(bootstrap, topic, "w", 1, sent)
    while "w0" not in done and time.monotonic() < deadline:
        time.sleep(0.01)
    done.clear()
    if backlog:
        submit(bootstrap, topic, "a", backlog, sent)
    while backlog and len(done) < min(64, backlog) and time.monotonic() < deadline:
        time.sleep(0.01)  # A's backlog is being served: now B arrives
    submit(bootstrap, topic, "b", late, sent)
    while len(done) < backlog + late and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.stop()
    thread.join(30)
    b_ms = sorted((done[t] - sent[t]) * 1000 for t in sent if t.startswith("b") and t in done)
    return {
        "fair_share": fair,
        "backlog": backlog,
        "late": late,
        "a_completed": sum(1 for t in done if t.startswith("a")),
        "b_completed": len(b_ms),
        "b_p50_ms": round(statistics.median(b_ms), 1) if b_ms else None,
        "b_p95_ms": round(_p95(b_ms), 1) if b_ms else None,
    }


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.95 * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--late", type=int, default=30)
    parser.add_argument("--cost-ms", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of idle, fair, fifo")
    args = parser.parse_args()
    load = os.getloadavg()
    cost_s = args.cost_ms / 1000
    rounds: list[dict[str, Any]] = []
    with LocalBroker() as broker:
        for _ in range(args.rounds):  # interleaved: load on the shared machine hits each alike
            runs = {
                "idle": one_run(broker.bootstrap, 0, args.late, True, cost_s),
                "fair": one_run(broker.bootstrap, args.backlog, args.late, True, cost_s),
                "fifo": one_run(broker.bootstrap, args.backlog, args.late, False, cost_s),
            }
            idle = runs["idle"]["b_p95_ms"] or 0.0
            for name in ("fair", "fifo"):
                p95 = runs[name]["b_p95_ms"] or 0.0
                runs[name]["p95_over_idle"] = round(p95 / idle, 2) if idle else None
            rounds.append(runs)
    report = {
        "scenario": "fair share: A's backlog, then B's few tasks (issue 11)",
        "cost_ms_per_record": args.cost_ms,
        "median": {
            key: statistics.median(r[run][field] or 0.0 for r in rounds)
            for key, run, field in (
                ("idle_b_p95_ms", "idle", "b_p95_ms"),
                ("fair_b_p95_ms", "fair", "b_p95_ms"),
                ("fifo_b_p95_ms", "fifo", "b_p95_ms"),
                ("fair_p95_over_idle", "fair", "p95_over_idle"),
                ("fifo_p95_over_idle", "fifo", "p95_over_idle"),
            )
        },
        "rounds": rounds,
        "machine": machine(load),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
