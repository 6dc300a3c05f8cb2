"""Quotas on the Kafka path: tasks published straight to Kafka by a tenant over its rate.

Starts its own LocalBroker and runs the inference stage's runtime (pipelined, fair share, quota
hold) in this process with a fixed-cost stand-in model (`--cost-ms` per record). Tenant `a`
publishes `--count` tasks at once to the normal lane, bypassing the gateway, with a quota of
`--rate` tasks/s and `--burst` (CONVEYOR_TENANT_QUOTAS); a second tenant `b` publishes
`--other` tasks at the same moment with no quota of its own. Recorded:

- `a`: completed, lost (never run), run twice, and the span from its first to its last start,
  against the floor the bucket allows, `(count - burst) / rate`; the achieved rate after the
  burst (target: the quota, not more);
- `b`: completed and its p95 start time from the first publish (a held tenant must not hold
  the others back).

Issue 11: "500 tasks published straight to Kafka by an over-quota tenant all complete, paced to
the quota, none lost". Writes bench/results/quota.json.

    python bench/quota.py [--count 500] [--rate 50] [--burst 20] [--other 100] [--cost-ms 1]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from confluent_kafka import Producer  # noqa: E402
from fairshare import record  # noqa: E402
from machine import machine  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.events.model import Event  # noqa: E402
from conveyor.kafka.admin import apply_topics  # noqa: E402
from conveyor.runtime.handler import BatchOutcome, StageContext, StageService  # noqa: E402
from conveyor.runtime.stage import StageRunner  # noqa: E402
from conveyor.settings import KafkaSettings, StageSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quota.json"
PREPROCESSED = "conveyor.task.preprocessed.v1"
RUN_TIMEOUT_S = 300.0


def run(bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"q{uuid.uuid4().hex[:8]}."
    apply_topics(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    topic = prefix + "conveyor.task.preprocessed.normal"
    started: dict[str, list[float]] = {}
    cost_s = args.cost_ms / 1000

    def model(events: Sequence[Event], _ctx: StageContext[Any]) -> list[BatchOutcome]:
        now = time.monotonic()
        for event in events:
            started.setdefault(event.data["task"]["task_id"], []).append(now)
        time.sleep(cost_s * len(events))
        return [None] * len(events)

    os.environ["CONVEYOR_TENANT_QUOTAS"] = json.dumps(
        {"a": {"rate": args.rate, "burst": args.burst}}
    )
    service = StageService("inference", StageSettings, handle_batch=model, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        batch_max=32,
        batch_wait_ms=20,
        pipelined=True,
        max_in_flight=64,
        fair_share=True,
        quota_hold=True,
    )
    runner = StageRunner(service, settings)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    # Warm up (group join, first fetch) with one task, so the figures do not count the start.
    key, value, headers = record("w0", "w")
    producer.produce(topic, value, key, headers=headers)
    producer.flush(30)
    warm = time.monotonic() + 60
    while "w0" not in started and time.monotonic() < warm:
        time.sleep(0.01)
    started.clear()
    sent = time.monotonic()  # b's times count from the first publish (publishing 600 takes a while)
    for i in range(max(args.count, args.other)):
        for tenant, n in (("a", args.count), ("b", args.other)):
            if i < n:
                key, value, headers = record(f"{tenant}{i}", tenant)
                producer.produce(topic, value, key, headers=headers)
    producer.flush(60)
    published_s = time.monotonic() - sent
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(started) < args.count + args.other and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # anything run twice shows up now
    runner.stop()
    thread.join(30)
    return {"publish_all_s": round(published_s, 2), **summary(started, sent, args)}


def summary(
    started: dict[str, list[float]], sent: float, args: argparse.Namespace
) -> dict[str, Any]:
    a = sorted(times[0] for task, times in started.items() if task.startswith("a"))
    b = sorted((times[0] - sent) * 1000 for task, times in started.items() if task.startswith("b"))
    span = a[-1] - a[0] if a else 0.0
    paced = a[args.burst :] if len(a) > args.burst else []
    after_burst = (len(paced) - 1) / (paced[-1] - paced[0]) if len(paced) > 1 else None
    return {
        "a_published": args.count,
        "a_completed": len(a),
        "a_lost": args.count - len(a),
        "a_run_twice": sum(1 for t, v in started.items() if t.startswith("a") and len(v) > 1),
        "a_span_s": round(span, 2),
        "a_floor_s": round((args.count - args.burst) / args.rate, 2),
        "a_rate_after_burst_per_s": round(after_burst, 1) if after_burst else None,
        "quota_rate_per_s": args.rate,
        "quota_burst": args.burst,
        "b_published": args.other,
        "b_completed": len(b),
        "b_start_p95_ms": round(b[min(len(b) - 1, int(0.95 * len(b)))], 1) if b else None,
        "b_start_p50_ms": round(statistics.median(b), 1) if b else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--other", type=int, default=100)
    parser.add_argument("--cost-ms", type=float, default=1.0)
    args = parser.parse_args()
    load = os.getloadavg()
    with LocalBroker() as broker:
        figures = run(broker.bootstrap, args)
    report = {
        "scenario": "quota: an over-rate tenant's tasks straight on Kafka (issue 11)",
        "cost_ms_per_record": args.cost_ms,
        "figures": figures,
        "machine": machine(load),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
