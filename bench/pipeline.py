"""Five-hop throughput: raw confluent-kafka passthrough vs the Conveyor runtime, tracing off and on.

Starts its own LocalBroker and, on it, three five-hop pipelines, each hop its own process:
(a) `raw`: consume → produce → flush → commit passthrough (bench/hops.py), (b) `conveyor`: the
five stages on the real runtime with a no-op relay handler, tracing off, (c) `conveyor_traced`:
the same with the OTel SDK on, always-on sampler, OTLP/HTTP to a local receiver. After a warm-up
(group joins), rounds interleave the pipelines so a neighbour's load hits them alike; a round
produces `--records` task events into hop 1 and times them until the last one is written by hop
5 (its CreateTime). Also records each pipeline's CPU per record per hop (the five processes'
CPU time) and, in this process without a broker, the runtime's own cost per record per hop
(`StageRunner.process` over fake clients, minus a raw loop over the same fakes).
Targets (ARCHITECTURE.md §10): (b) ≥ 50% of (a); (c) ≤ 10% slower than (b); ~15 µs/record/hop.
Writes bench/results/pipeline.json with the machine's description. Bounded: no round starts
after `--budget` seconds (default 120), so a run stays under three minutes.

    python bench/pipeline.py [--records 6000] [--rounds 5] [--budget 120]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hops import FINAL_TOPIC, STAGES, input_records, run_raw_hop, run_relay  # noqa: E402
from machine import cpu_seconds, machine  # noqa: E402
from overhead import runtime_overhead  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.events.catalog import INGRESS_TOPIC, load_catalog  # noqa: E402
from conveyor.local.otlp import OtlpReceiver  # noqa: E402
from conveyor.settings import KafkaSettings  # noqa: E402
from conveyor.topology import apply_topics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"
WARMUP = 2_000  # records per pipeline before timing: group joins, producer ids, caches
ROUND_TIMEOUT_S = 60.0


@dataclass
class Pipeline:
    name: str
    source: str
    sink: str
    pids: list[int] = field(default_factory=list)
    reader: Any = None
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=6_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds; no round after")
    args = parser.parse_args()
    began = time.monotonic()
    deadline = began + args.budget
    load = os.getloadavg()
    with LocalBroker() as broker:
        broker_s = time.monotonic() - began
        with OtlpReceiver(keep_spans=False) as otlp:
            pipelines = run_pipelines(
                broker.bootstrap, otlp.endpoint, args.records, args.rounds, deadline
            )
            spans = otlp.span_count
            overhead = runtime_overhead(otlp.endpoint)
    report = summarise(pipelines, spans, overhead, args, broker_s, load)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def run_pipelines(
    bootstrap: str, otlp: str, records: int, rounds: int, deadline: float
) -> list[Pipeline]:
    run = uuid.uuid4().hex[:6]
    raw = [f"b{run}-raw.hop{i}" for i in range(6)]
    create_raw_topics(bootstrap, raw)
    off, on, smp = f"b{run}-off.", f"b{run}-on.", f"b{run}-smp."
    for prefix in (off, on, smp):
        apply_topics(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    pipelines = [
        Pipeline("raw", raw[0], raw[-1]),
        Pipeline("conveyor", off + INGRESS_TOPIC, off + FINAL_TOPIC),
        Pipeline("conveyor_traced", on + INGRESS_TOPIC, on + FINAL_TOPIC),
        Pipeline("conveyor_sampled", smp + INGRESS_TOPIC, smp + FINAL_TOPIC),
    ]
    traced = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SDK_DISABLED": "false",
    }
    # What a production deployment runs: trace 10% of tasks, every hop follows the root's choice.
    sampled = {
        **traced,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
    }
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs = []
    for i in range(5):
        procs.append(
            ctx.Process(
                target=run_raw_hop, args=(bootstrap, raw[i], raw[i + 1], f"b{run}-raw-{i}", stop)
            )
        )
    for prefix, env in ((off, {"OTEL_SDK_DISABLED": "true"}), (on, traced), (smp, sampled)):
        for stage in STAGES:
            procs.append(ctx.Process(target=run_relay, args=(stage, bootstrap, prefix, env, stop)))
    for proc in procs:
        proc.start()
    for i, pipeline in enumerate(pipelines):
        pipeline.pids = [p.pid for p in procs[i * 5 : (i + 1) * 5] if p.pid is not None]
    try:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        for pipeline in pipelines:
            pipeline.reader = reader(bootstrap, pipeline.sink)
            measure(pipeline, producer, input_records(WARMUP, f"{run}-warm"), timeout_s=120)
        for n in range(rounds):
            if n and time.monotonic() > deadline:
                break  # keep the run bounded: fewer rounds on a slow or busy machine
            k = n % len(pipelines)
            order = pipelines[k:] + pipelines[:k]
            for pipeline in order:
                rate, cpu_us = measure(pipeline, producer, input_records(records, f"{run}-{n}"))
                pipeline.rates.append(rate)
                pipeline.cpu_us.append(cpu_us)
                print(
                    f"round {n + 1} {pipeline.name}: {rate:,.0f} records/s, "
                    f"{cpu_us:.1f} µs CPU/record/hop",
                    file=sys.stderr,
                )
    finally:
        stop.set()
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.terminate()
        for pipeline in pipelines:
            if pipeline.reader is not None:
                pipeline.reader.close()
    return pipelines


def create_raw_topics(bootstrap: str, names: list[str]) -> None:
    partitions = load_catalog().partitions  # the same as the stage topics
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    for future in futures.values():
        future.result(30)


def reader(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    return consumer


def measure(
    pipeline: Pipeline,
    producer: Producer,
    records: list[Any],
    *,
    timeout_s: float = ROUND_TIMEOUT_S,
) -> tuple[float, float]:
    """(records/s from the first produce to hop 5's last CreateTime, CPU µs per record per hop)."""
    done = threading.Event()
    last_ms = [0]

    def read() -> None:
        seen, deadline = 0, time.monotonic() + timeout_s
        while seen < len(records) and time.monotonic() < deadline:
            for msg in pipeline.reader.consume(1000, 0.1):
                if msg.error() is None:
                    seen += 1
                    last_ms[0] = max(last_ms[0], msg.timestamp()[1])
        if seen >= len(records):
            done.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    cpu0 = cpu_seconds(pipeline.pids)
    started = time.time()
    for i, (key, value, headers) in enumerate(records):
        producer.produce(pipeline.source, value, key, headers=headers)
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush(30)
    thread.join(timeout_s + 5)
    cpu1 = cpu_seconds(pipeline.pids)
    if not done.is_set():
        raise RuntimeError(f"{pipeline.name}: {len(records)} records not through in {timeout_s}s")
    elapsed = max(last_ms[0] / 1000 - started, 1e-3)
    return len(records) / elapsed, (cpu1 - cpu0) / (len(records) * 5) * 1e6


def summarise(
    pipelines: list[Pipeline],
    spans: int,
    overhead: dict[str, Any],
    args: argparse.Namespace,
    broker_s: float,
    load: tuple[float, ...],
) -> dict[str, Any]:
    rate = {p.name: round(statistics.median(p.rates)) for p in pipelines}
    cpu = {p.name: round(statistics.median(p.cpu_us), 1) for p in pipelines}
    expected_spans = 5 * (WARMUP + args.records * len(pipelines[2].rates))  # always_on only
    return {
        "benchmark": "pipeline",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(load),
        "records_per_round": args.records,
        "rounds": min(len(p.rates) for p in pipelines),
        "broker_start_seconds": round(broker_s, 1),
        "throughput_records_per_s": rate,
        "all_rounds_records_per_s": {p.name: [round(r) for r in p.rates] for p in pipelines},
        "cpu_us_per_record_per_hop": cpu,
        "conveyor_vs_raw": round(rate["conveyor"] / rate["raw"], 3),
        "traced_slowdown": round(1 - rate["conveyor_traced"] / rate["conveyor"], 3),
        "sampled_slowdown": round(1 - rate["conveyor_sampled"] / rate["conveyor"], 3),
        "targets": {
            "conveyor_vs_raw_min": 0.5,
            "traced_slowdown_max": 0.10,
            "runtime_us_per_record_per_hop": 15,
        },
        "spans_exported": spans,
        "spans_expected_always_on": expected_spans,  # plus ~10% of the sampled pipeline's
        "runtime_overhead_in_process": overhead,
        "method": {
            "raw": "consume(500) → produce each record unchanged → flush → async commit; same "
            "librdkafka config as the stages (conveyor.kafka.config)",
            "conveyor": "StageRunner per stage with a handler that re-emits a fixed event of "
            "the stage's output type; logging at WARNING (no per-record line)",
            "conveyor_traced": "as conveyor, OTel SDK, always_on sampler, BatchSpanProcessor "
            "defaults, OTLP/HTTP to a receiver in the bench process",
            "conveyor_sampled": "as conveyor_traced with parentbased_traceidratio 0.1: one "
            "task in ten traced at every hop, the rest hand their context on without a span",
            "hops": "each hop its own process; the three pipelines run on one broker, in turn",
        },
    }


if __name__ == "__main__":
    main()
