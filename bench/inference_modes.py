"""Inference throughput by runtime mode: the plain loop, pipelined, pipelined with fair share.

Starts its own LocalBroker; for each mode, `--records` task-preprocessed events wait on a fresh
normal-lane topic and the inference stage's runtime (in this process) drains them through a
stand-in model with the shape of a GPU batch: `--batch-ms` per batch of up to 32 records, the
GIL released (`time.sleep`). Recorded per mode: records/s from the first to the last model call
and that rate over the bare model called back to back (target, ARCHITECTURE.md §10: >= 90%),
the mean batch size, and a run's spread over `--rounds` rounds (modes interleaved, so load on
the shared machine hits them alike). Fair share on by default for inference needs the
pipelined mode to keep up with the plain loop. Writes bench/results/inference_modes.json.

    python bench/inference_modes.py [--records 3200] [--batch-ms 50] [--rounds 3]
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

RESULTS = Path(__file__).resolve().parent / "results" / "inference_modes.json"
PREPROCESSED = "conveyor.task.preprocessed.v1"
BATCH = 32
MODES = {
    "plain": {"pipelined": False, "fair_share": False},
    "pipelined": {"pipelined": True, "fair_share": False},
    "pipelined_fair": {"pipelined": True, "fair_share": True},
}


def one_run(bootstrap: str, mode: str, records: int, batch_s: float) -> dict[str, Any]:
    prefix = f"m{uuid.uuid4().hex[:8]}."
    apply_topics(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    topic = prefix + "conveyor.task.preprocessed.normal"
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(records):
        key, value, headers = record(f"t{i}", "ab"[i % 2])
        producer.produce(topic, value, key, headers=headers)
    producer.flush(60)
    calls: list[tuple[float, int]] = []

    def model(events: Sequence[Event], _ctx: StageContext[Any]) -> list[BatchOutcome]:
        calls.append((time.monotonic(), len(events)))
        for _ in range(-(-len(events) // BATCH)):
            time.sleep(batch_s)
        return [None] * len(events)

    service = StageService("inference", StageSettings, handle_batch=model, accepts=(PREPROCESSED,))
    settings = StageSettings(
        stage="inference",
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        batch_max=BATCH,
        batch_wait_ms=20,
        priority_lanes=True,
        max_in_flight=2 * BATCH,
        **MODES[mode],
    )
    runner = StageRunner(service, settings)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while sum(n for _, n in calls) < records and time.monotonic() < deadline:
        time.sleep(0.02)
    end = time.monotonic()
    runner.stop()
    thread.join(30)
    served = sum(n for _, n in calls)
    # From the first call to the end of the last one: the stage's start-up is not counted.
    elapsed = end - calls[0][0] if calls else float("nan")
    return {
        "records": served,
        "records_per_s": round(served / elapsed, 1),
        "mean_batch": round(served / len(calls), 1) if calls else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3200)
    parser.add_argument("--batch-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()
    batch_s = args.batch_ms / 1000
    bare = BATCH / batch_s
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with LocalBroker() as broker:
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(one_run(broker.bootstrap, mode, args.records, batch_s))
    summary = {}
    for mode, results in runs.items():
        rates = [r["records_per_s"] for r in results]
        summary[mode] = {
            "median_records_per_s": statistics.median(rates),
            "of_bare_model": round(statistics.median(rates) / bare, 3),
            "rounds": rates,
            "mean_batch": [r["mean_batch"] for r in results],
        }
    report = {
        "scenario": "inference runtime modes on a 50 ms-per-32 stand-in model (issue 11)",
        "bare_model_records_per_s": bare,
        "records": args.records,
        "modes": summary,
        "machine": machine(load),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
