"""The runtime's own CPU cost per record per hop, in-process, without a broker.

`StageRunner._process` (decode, span, metrics, relay handler, routing, Avro encode, CloudEvents
headers, trace inject, produce call, commit) runs over fake Kafka clients on batches of
task-inferred records (the moderation stage's input, as inference emits them, with trace
context), and the same batches go through a raw loop (read the message, produce it unchanged)
over the same fakes; the difference is the runtime's overhead. Measured three ways: tracing off
(logging at WARNING), tracing off with the per-record INFO outcome line a service writes, and
tracing on (parent-based always-on sampler, OTLP/HTTP to the bench's receiver) for records
whose trace is sampled and for records whose trace is not (what most records cost under
`parentbased_traceidratio`). CPU time of the stage loop's thread only: the exporter's thread
(and the receiver in this process) are left out; bench/pipeline.py's per-process CPU figures
include the export.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from bench_fakes import FakeConsumer, FakeMessage, FakeProducer
from hops import OUTPUT_DATA, relay_service
from opentelemetry.trace import INVALID_SPAN

from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import decode_mapped, encode_binary, header_map
from conveyor.events.model import AVRO, Event, event_id
from conveyor.runtime.handler import Emit
from conveyor.runtime.routing import Item
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from conveyor.telemetry import tracing
from conveyor.telemetry.logging import TextFormatter

INFERRED = "conveyor.task.inferred.v1"
MODERATED = "conveyor.task.moderated.v1"
BATCH = 500
ROUNDS = 20
TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-{flags}"


def batch_of_inferred(n: int, *, sampled: bool = True) -> list[FakeMessage]:
    spec = load_catalog().spec(INFERRED)
    assert spec is not None
    schemas = default_schemas()
    parent = TRACEPARENT.format(flags="01" if sampled else "00")
    out = []
    for i in range(n):
        task_id = f"ovh-{i}"
        event = Event(
            id=event_id(task_id, INFERRED),
            type=INFERRED,
            source="/conveyor/inference",
            subject=task_id,
            data=OUTPUT_DATA[INFERRED],
            datacontenttype=AVRO,
            dataschema=spec.dataschema,
            time="2026-01-01T00:00:00.000Z",
            extensions={"tenant": "acme", "priority": "normal", "traceparent": parent},
        )
        headers, value = encode_binary(event, schemas)
        headers.append(("traceparent", parent.encode()))
        out.append(
            FakeMessage("conveyor.task.inferred", i % 3, i, task_id.encode(), value, headers)
        )
    return out


def cpu_us_per_record(
    step: Callable[[list[FakeMessage]], None],
    batch: list[FakeMessage],
    flush: Callable[[], None] = lambda: None,
) -> float:
    """Process CPU time per record (background export threads included) over ROUNDS batches."""
    step(batch)  # warm caches and metric children
    started = time.thread_time()
    for _ in range(ROUNDS):
        step(batch)
    used = time.thread_time() - started
    flush()
    return used / (ROUNDS * len(batch)) * 1e6


def runtime_overhead(otlp_endpoint: str) -> dict[str, Any]:
    batch = batch_of_inferred(BATCH)
    producer = FakeProducer()
    runner = StageRunner(
        relay_service("moderation"),
        StageSettings(stage="moderation", kafka_bootstrap="unused:9092"),
    )
    runner.consumer, runner.producer = FakeConsumer(), producer  # type: ignore[assignment]

    def raw(msgs: list[FakeMessage]) -> None:
        for msg in msgs:
            if msg.error() is None:
                producer.produce("out", msg.value(), msg.key(), headers=msg.headers())
        producer.flush(30)

    raw_us = cpu_us_per_record(raw, batch)
    off_us = cpu_us_per_record(runner._process, batch)
    with_log_us = _with_info_log(lambda: cpu_us_per_record(runner._process, batch))
    steps = breakdown(runner, batch[0])  # before tracing goes on: it stays on in this process
    traced_us, unsampled_us = _traced(
        otlp_endpoint, runner, batch, batch_of_inferred(BATCH, sampled=False)
    )
    return {
        "raw_loop_us_per_record": round(raw_us, 2),
        "runtime_us_per_record": round(off_us, 2),
        "runtime_overhead_us": round(off_us - raw_us, 2),
        "with_info_log_line_us_per_record": round(with_log_us, 2),
        "traced_us_per_record": round(traced_us, 2),
        "tracing_hot_path_cost_us": round(traced_us - off_us, 2),
        "traced_unsampled_us_per_record": round(unsampled_us, 2),
        "where_the_time_goes_us": steps,
        "note": "moderation relay stage over fake clients, batches of 500; CPU time of the "
        "loop's thread (span export runs in another thread and is not included)",
    }


def breakdown(runner: StageRunner, msg: FakeMessage) -> dict[str, float]:
    """The largest per-record steps of `_process`, each timed alone (µs of CPU)."""
    hmap = header_map(msg.headers())
    event = decode_mapped(hmap, msg.value(), runner.schemas)
    item = Item(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.value(),
        msg.headers(),
        hmap,
        INVALID_SPAN,
        event,
    )
    emit = Emit(MODERATED, OUTPUT_DATA[MODERATED])
    steps: dict[str, Callable[[], object]] = {
        "decode (header map + CloudEvent + Avro)": lambda: decode_mapped(
            header_map(msg.headers()), msg.value(), runner.schemas
        ),
        "of which Avro decode": lambda: runner.schemas.decode_urn(
            hmap["ce_dataschema"], msg.value()
        ),
        "route output (id + CloudEvent headers + Avro + size)": lambda: runner.router.outputs(
            item, [emit], "2026-01-01T00:00:00.000Z"
        ),
        "of which Avro encode": lambda: runner.schemas.encode(
            "task-moderated", 1, dict(OUTPUT_DATA[MODERATED])
        ),
        "of which event id (uuid5)": lambda: event_id("ovh-0", MODERATED),
        "e2e latency observation": lambda: runner._observe_e2e(item, time.time()),
    }
    out = {}
    for name, step in steps.items():
        started = time.thread_time()
        for _ in range(2000):
            step()
        out[name] = round((time.thread_time() - started) / 2000 * 1e6, 1)
    return out


def _with_info_log(measure: Callable[[], float]) -> float:
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115
    handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s moderation %(name)s %(message)s"))
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        return measure()
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        handler.stream.close()


def _traced(
    endpoint: str, runner: StageRunner, sampled: list[FakeMessage], unsampled: list[FakeMessage]
) -> tuple[float, float]:
    os.environ.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SDK_DISABLED": "false",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        }
    )
    if not tracing.init_tracing("bench-overhead"):
        raise RuntimeError("tracing did not switch on")
    from opentelemetry import trace

    provider: Any = trace.get_tracer_provider()
    try:
        return (
            cpu_us_per_record(runner._process, sampled, flush=provider.force_flush),
            cpu_us_per_record(runner._process, unsampled, flush=provider.force_flush),
        )
    finally:
        tracing.shutdown_tracing()
