"""The runtime's own CPU cost per record per hop, in-process, without a broker.

`StageRunner.process` (decode, span, metrics, relay handler, routing, Avro encode, CloudEvents
headers, trace inject, produce call, commit) runs over fake Kafka clients on batches of
task-inferred records (the moderation stage's input, as inference emits them, with trace
context), and the same batches go through a raw loop (read the message, produce it unchanged)
over the same fakes; the difference is the runtime's overhead. Measured: tracing off (logging at
WARNING), tracing off with the per-record INFO outcome line a service writes, and tracing on
(parent-based always-on sampler, OTLP/HTTP to the bench's receiver) for records whose trace is
sampled and for records whose trace is not (what most records cost under
`parentbased_traceidratio`). The three tracing modes are timed in turn, batch by batch, in one
process, so that a shared machine's changing load hits them alike. CPU time of the stage loop's
thread: span export (the BatchSpanProcessor's thread) is timed apart, per span, with the SDK's
OTLP encoder and exporter (the runtime's, public API only); so is each tracing step of a
record, as the runtime does it and as the stock OpenTelemetry calls do it.

    python bench/overhead.py    # prints the figures, writes bench/results/overhead.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fakes import FakeConsumer, FakeMessage, FakeProducer  # noqa: E402
from hops import OUTPUT_DATA, relay_service  # noqa: E402
from opentelemetry.trace import INVALID_SPAN, SpanKind  # noqa: E402

from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import decode_lazy, decode_mapped, encode_binary, header_map
from conveyor.events.model import AVRO, Event, event_id
from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.producer import KafkaProducer
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
RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
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
    runner.attach(
        KafkaConsumer(FakeConsumer()),  # type: ignore[arg-type]
        KafkaProducer(producer, delivery_timeout_s=30),  # type: ignore[arg-type]
    )

    def raw(msgs: list[FakeMessage]) -> None:
        for msg in msgs:
            if msg.error() is None:
                producer.produce("out", msg.value(), msg.key(), headers=msg.headers())
        producer.flush(30)

    raw_us = cpu_us_per_record(raw, batch)
    off_us = cpu_us_per_record(runner.process, batch)
    with_log_us = _with_info_log(lambda: cpu_us_per_record(runner.process, batch))
    steps = breakdown(runner, batch[0])  # before tracing goes on: it stays on in this process
    traced = _traced(otlp_endpoint, runner, batch, batch_of_inferred(BATCH, sampled=False))
    per_record = traced.pop("interleaved_us_per_record")
    off, on, unsampled = (per_record[m]["median"] for m in ("off", "sampled", "unsampled"))
    return {
        "raw_loop_us_per_record": round(raw_us, 2),
        "runtime_us_per_record": round(off_us, 2),
        "runtime_overhead_us": round(off_us - raw_us, 2),
        "with_info_log_line_us_per_record": round(with_log_us, 2),
        "traced_us_per_record": on,
        "tracing_hot_path_cost_us": round(on - off, 2),
        "traced_unsampled_us_per_record": unsampled,
        "unsampled_cost_us": round(unsampled - off, 2),
        "tracing_interleaved_us_per_record": per_record,
        **traced,
        "where_the_time_goes_us": steps,
        "note": "moderation relay stage over fake clients, batches of 500; CPU time of the "
        "loop's thread. Traced figures: medians of per-batch figures taken in turn with tracing "
        "off (same process, tracing.enabled() False), on with sampled and with unsampled parents; "
        "span export is timed apart (span_export_us_per_span), as the BatchSpanProcessor's thread "
        "spends it",
    }


def breakdown(runner: StageRunner, msg: FakeMessage) -> dict[str, float]:
    """The largest per-record steps of `StageRunner.process`, each timed alone (µs of CPU)."""
    hmap = header_map(msg.headers())
    event = decode_mapped(hmap, msg.value(), runner.router.schemas)
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
            header_map(msg.headers()), msg.value(), runner.router.schemas
        ),
        "of which Avro decode": lambda: runner.router.schemas.decode_urn(
            hmap["ce_dataschema"], msg.value()
        ),
        # What the runtime does now: the data is decoded only when a handler reads it.
        "decode, lazy (header map + CloudEvent + the data's head)": lambda: (
            decode_lazy(header_map(msg.headers()), msg.value(), runner.router.schemas).head
        ),
        "of which the data's head": lambda: runner.router.schemas.head_urn(
            hmap["ce_dataschema"], msg.value()
        ),
        "route output (id + CloudEvent headers + Avro + size)": lambda: runner.router.outputs(
            item, [emit], "2026-01-01T00:00:00.000Z"
        ),
        "of which Avro encode": lambda: runner.router.schemas.encode(
            "task-moderated", 1, dict(OUTPUT_DATA[MODERATED])
        ),
        "of which event id (uuid5)": lambda: event_id("ovh-0", MODERATED),
        "e2e latency observation": lambda: runner.telemetry._observe_e2e(item, time.time()),
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
) -> dict[str, Any]:
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
        batches = {"off": sampled, "sampled": sampled, "unsampled": unsampled}
        per_record, flush_us = _interleaved(runner, batches, provider.force_flush)
        steps = tracing_steps(runner, sampled[0], provider.force_flush)
        spans = _spans_of(runner, sampled, provider)  # last: it adds a span processor
        export = span_export_cost(spans)
        export["exporter_thread_in_runs_us_per_span"] = flush_us
        return {
            "interleaved_us_per_record": per_record,
            "tracing_steps_us": steps,
            "span_export_us_per_span": export,
        }
    finally:
        tracing.shutdown_tracing()


def _interleaved(
    runner: StageRunner, batches: dict[str, list[FakeMessage]], flush: Callable[[], object]
) -> tuple[dict[str, dict[str, float]], float]:
    """Loop-thread CPU per record of each batch, the modes taken in turn each round so that the
    changing load of a shared machine hits them alike. Spans are exported after each batch,
    outside its timed window; that export's own CPU (this thread's) is the second value, µs per
    span."""
    runs: dict[str, list[float]] = {mode: [] for mode in batches}
    exports: list[float] = []
    modes = list(batches)
    for round_ in range(ROUNDS + 1):  # the first round warms caches and metric children
        # Each round starts with the next mode: what a batch leaves behind (garbage for the
        # collector, a flushed span queue) falls on each of the others alike.
        for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
            batch = batches[mode]
            switch = mock.patch.object(tracing, "enabled", lambda: False)
            with switch if mode == "off" else contextlib.nullcontext():
                started = time.thread_time()
                runner.process(batch)
                runs[mode].append((time.thread_time() - started) / len(batch) * 1e6)
            started = time.thread_time()
            flush()
            if mode == "sampled":
                exports.append((time.thread_time() - started) / len(batch) * 1e6)
    return {
        mode: {"median": round(statistics.median(v[1:]), 2), "min": round(min(v[1:]), 2)}
        for mode, v in runs.items()
    }, round(statistics.median(exports[1:]), 2)


def tracing_steps(
    runner: StageRunner, msg: FakeMessage, flush: Callable[[], object]
) -> dict[str, float]:
    """µs per call of each tracing step of a record, as the runtime does it now, and as the
    OpenTelemetry API's stock calls (which it used before) do it."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    hmap = header_map(msg.headers())
    event = decode_mapped(hmap, msg.value(), runner.router.schemas)
    carrier = {"traceparent": hmap["traceparent"]}
    parent = tracing.remote_parent(hmap)
    context = tracing.context_of(parent)
    dropped = tracing.remote_span(TRACEPARENT.format(flags="00"))
    attributes = runner.telemetry._span_attributes(msg, hmap, event)
    sdk = tracing.tracer()
    span = tracing.start_span("process t", parent=context, attributes=attributes)
    sampler = "OTEL_TRACES_SAMPLER"
    steps: dict[str, Callable[[], object]] = {
        "read traceparent, W3C propagator (before)": lambda: propagator.extract(carrier),
        "read traceparent, tracing.remote_parent": lambda: tracing.remote_parent(hmap),
        "sampler kind from os.environ (before, per record)": lambda: os.environ.get(sampler, ""),
        "unsampled parent: tracing.record_span": lambda: tracing.record_span(
            "process t", parent=dropped, attributes=lambda: attributes
        ),
        "span start+end, attributes checked by the SDK (before)": lambda: sdk.start_span(
            "process t", context=context, kind=SpanKind.CONSUMER, attributes=dict(attributes)
        ).end(),
        "span start+end, tracing.start_span": lambda: tracing.end_span(
            tracing.start_span(
                "process t", parent=context, kind=SpanKind.CONSUMER, attributes=attributes
            )
        ),
        "write traceparent, W3C propagator (before)": lambda: propagator.inject(
            {}, context=trace.set_span_in_context(span)
        ),
        "write traceparent, tracing.inject": lambda: tracing.inject(span),
        "activate + deactivate (handler spans nest)": lambda: tracing.deactivate(
            tracing.activate(span)
        ),
    }
    return _per_call(steps, flush)


def _per_call(
    steps: dict[str, Callable[[], object]], flush: Callable[[], object]
) -> dict[str, float]:
    """µs of CPU per call of each step: the best of 9 runs of 400 calls, the steps taken in turn
    in each round; spans are exported between runs, untimed (400 stays below the span queue's
    2048, so none is dropped)."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(9):
        for name, step in steps.items():
            started = time.thread_time()
            for _ in range(400):
                step()
            best[name] = min(best[name], time.thread_time() - started)
            flush()
    return {name: round(seconds / 400 * 1e6, 2) for name, seconds in best.items()}


def _spans_of(runner: StageRunner, batch: list[FakeMessage], provider: Any) -> list[Any]:
    """The consume spans the runtime makes for `batch`, as the exporter receives them."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    runner.process(batch)
    provider.force_flush()
    return list(memory.get_finished_spans())


def span_export_cost(spans: list[Any]) -> dict[str, float]:
    """CPU per span of encoding `spans` into one OTLP request with the SDK's encoder, and of
    exporting them over OTLP/HTTP with the exporter the runtime installs (the SDK's own,
    `tracing.otlp_exporter`, configured by the OTEL_* variables): encoding + the POST, client
    side, as the BatchSpanProcessor's thread spends it."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    exporter = tracing.otlp_exporter()
    try:
        steps: dict[str, Callable[[], object]] = {
            "encode, SDK encoder": lambda: encode_spans(spans).SerializePartialToString(),
            "export over OTLP/HTTP, SDK exporter": lambda: exporter.export(spans),
        }
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(5):  # in turn, so that a change in the machine's load hits all alike
            for name, step in steps.items():
                started = time.thread_time()
                step()
                best[name] = min(best[name], time.thread_time() - started)
        return {name: round(seconds / len(spans) * 1e6, 2) for name, seconds in best.items()}
    finally:
        exporter.shutdown()


def main() -> None:
    """Run the in-process measurements alone; prints them and writes results/overhead.json."""
    from conveyor.local.otlp import OtlpReceiver

    load = os.getloadavg()
    with OtlpReceiver(keep_spans=False) as otlp:
        figures = runtime_overhead(otlp.endpoint)
    report = {
        "benchmark": "overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "opentelemetry_sdk": version("opentelemetry-sdk"),
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            # A speed reference for the µs figures: ~10 µs on an idle modern x86 core.
            "calibration_us_sum_range_1000": round(
                timeit.timeit("sum(range(1000))", number=2000) / 2000 * 1e6, 1
            ),
        },
        **figures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
