"""Admission control: the estimated start of a task against its measured start, with a backlog.

Starts its own LocalBroker, runs the inference stage's runtime in this process with a
fixed-cost stand-in model (`--cost-ms` per record, one call per batch), and the gateway's
estimator (`Admission` over `KafkaBacklog`: committed offsets and watermarks of the real
groups, the same probe the gateway uses). A backlog of `--backlog` tasks is published to the
normal lane while the stage runs, and after `--warmup-s` (the estimator's rate needs served
records over two probes), every `--every-s` for `--probes` rounds, `--burst` more tasks and one
probe task are published (arrivals a little under the service rate: the backlog stays). For each
probe the estimate is taken the moment before it is published (as the gateway does before it
answers 202) and its start is when the stand-in model receives it. Recorded: the estimate's
error (measured - estimated start, seconds; positive: it started later than estimated), median
and p90 of the absolute error, and the same relative to the estimated wait.

All tasks are one tenant's, so fair share (on or off) does not reorder the probes. The ingress
and preprocess hop are not run (nothing waits on the ingress topic, so the estimate is the
lanes' part alone). Writes bench/results/admission.json.

    python bench/admission.py [--backlog 3000] [--probes 20] [--cost-ms 4] [--plain]
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

from conveyor.admission import LANES, Admission, KafkaBacklog  # noqa: E402
from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.events.model import Event  # noqa: E402
from conveyor.kafka.admin import apply_topics  # noqa: E402
from conveyor.runtime.handler import BatchOutcome, StageContext, StageService  # noqa: E402
from conveyor.runtime.stage import StageRunner  # noqa: E402
from conveyor.settings import KafkaSettings, StageSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "admission.json"
PREPROCESSED = "conveyor.task.preprocessed.v1"
RUN_TIMEOUT_S = 300.0


def run(bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"a{uuid.uuid4().hex[:8]}."
    apply_topics(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    topic = prefix + "conveyor.task.preprocessed.normal"
    started: dict[str, float] = {}
    cost_s = args.cost_ms / 1000

    def model(events: Sequence[Event], _ctx: StageContext[Any]) -> list[BatchOutcome]:
        now = time.time()
        for event in events:
            started.setdefault(event.data["task"]["task_id"], now)
        time.sleep(cost_s * len(events))
        return [None] * len(events)

    service = StageService("inference", StageSettings, handle_batch=model, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        batch_max=32,
        batch_wait_ms=20,
        pipelined=not args.plain,  # the inference defaults: pipelined with fair share
        fair_share=not args.plain,
    )
    runner = StageRunner(service, settings)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    backlog = KafkaBacklog(
        {"bootstrap.servers": bootstrap},
        ingress=(prefix + "conveyor.preprocess", prefix + "conveyor.task.submitted"),
        inference_group=prefix + "conveyor.inference",
        lanes={lane: prefix + f"conveyor.task.preprocessed.{lane}" for lane in LANES},
    )
    admission = Admission(backlog, ttl_s=1.0, window_s=30.0)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    sent = 0

    def publish(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            key, value, headers = record(f"t{sent}", "a")
            producer.produce(topic, value, key, headers=headers)
            sent += 1
        producer.flush(30)

    publish(args.backlog)
    warm = time.monotonic() + args.warmup_s
    while time.monotonic() < warm:
        admission.check("normal", None, datetime.now(UTC))  # the gateway's probes, every 1 s
        time.sleep(0.2)
    probes: list[tuple[str, datetime | None, float | None, float]] = []
    for i in range(args.probes):
        time.sleep(args.every_s)
        publish(args.burst)
        verdict = admission.check("normal", None, datetime.now(UTC))
        key, value, headers = record(f"p{i}", "a")
        producer.produce(topic, value, key, headers=headers)
        producer.flush(30)
        probes.append((f"p{i}", verdict.start, verdict.wait_s, time.time()))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(started) < sent + args.probes and time.monotonic() < deadline:
        time.sleep(0.05)
    runner.stop()
    thread.join(30)
    backlog.close()
    return summary(probes, started)


def summary(
    probes: list[tuple[str, datetime | None, float | None, float]], started: dict[str, float]
) -> dict[str, Any]:
    errors, relative, rows = [], [], []
    for task, start, wait_s, at in probes:
        measured = started.get(task)
        if start is None or measured is None or wait_s is None:
            rows.append({"task": task, "estimated_wait_s": wait_s, "measured_wait_s": None})
            continue
        error = measured - start.timestamp()
        errors.append(error)
        if wait_s > 0:
            relative.append(abs(error) / wait_s)
        measured_wait = round(measured - at, 2)
        rows.append(
            {"task": task, "estimated_wait_s": round(wait_s, 2), "measured_wait_s": measured_wait}
        )
    absolute = sorted(abs(e) for e in errors)
    return {
        "probes": len(probes),
        "estimated": len(errors),
        "error_median_s": round(statistics.median(errors), 2) if errors else None,
        "abs_error_median_s": round(statistics.median(absolute), 2) if absolute else None,
        "abs_error_p90_s": round(_p90(absolute), 2) if absolute else None,
        "relative_error_median": round(statistics.median(relative), 3) if relative else None,
        "relative_error_p90": round(_p90(sorted(relative)), 3) if relative else None,
        "rows": rows,
    }


def _p90(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.9 * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=3000)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--every-s", type=float, default=0.5)
    parser.add_argument("--cost-ms", type=float, default=4.0)
    parser.add_argument("--plain", action="store_true", help="the plain loop, no fair share")
    args = parser.parse_args()
    load = os.getloadavg()
    with LocalBroker() as broker:
        figures = run(broker.bootstrap, args)
    report = {
        "scenario": "admission: estimated against measured start with a backlog (issue 11)",
        "arguments": vars(args),
        "figures": figures,
        "machine": machine(load),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
