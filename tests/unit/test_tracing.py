"""Tracing helpers without a broker: parentage across a Kafka hop, handler spans, log lines.

Spans are recorded by an in-memory SDK provider patched into `tracing.tracer` for one test, so
the process-wide tracer provider (and every other test) stays untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor.telemetry import tracing
from conveyor.telemetry.logging import JsonFormatter, TextFormatter
from conveyor.telemetry.traceparent import trace_id_of


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_next_hop_span_is_child_of_the_injected_span(exported: InMemorySpanExporter) -> None:
    first = tracing.start_span("process a", parent=None, kind=SpanKind.CONSUMER)
    headers = dict((k, v.decode()) for k, v in tracing.inject(first))
    second = tracing.start_span("process b", parent=tracing.parent_context(headers))
    tracing.end_span(second)
    tracing.end_span(first)
    spans = by_name(exported)
    assert spans["process b"].context.trace_id == spans["process a"].context.trace_id
    assert spans["process b"].parent is not None
    assert spans["process b"].parent.span_id == spans["process a"].context.span_id


def test_traceparent_header_wins_over_the_cloudevents_attribute() -> None:
    hop = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    start = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    ctx = tracing.parent_context({"traceparent": hop, "ce_traceparent": start})
    assert ctx is not None
    from opentelemetry import trace

    assert format(trace.get_current_span(ctx).get_span_context().span_id, "016x") == hop[36:52]
    only_ce = tracing.parent_context({"ce_traceparent": start})
    assert only_ce is not None
    span_id = trace.get_current_span(only_ce).get_span_context().span_id
    assert format(span_id, "016x") == start[36:52]
    assert tracing.parent_context({}) is None


def test_record_without_context_gets_a_new_root_even_inside_another_span(
    exported: InMemorySpanExporter,
) -> None:
    with tracing.span("loop"):
        root = tracing.start_span("process x", parent=None)
        tracing.end_span(root)
    assert by_name(exported)["process x"].parent is None


def test_handler_span_nests_in_the_current_span_and_records_the_error(
    exported: InMemorySpanExporter,
) -> None:
    record = tracing.start_span("process in", parent=None)
    token = tracing.activate(record)
    upserting = tracing.span("db upsert", {"db.operation.name": "upsert"})
    with pytest.raises(ValueError, match="boom"), upserting:
        raise ValueError("boom")
    tracing.deactivate(token)
    tracing.end_span(record)
    spans = by_name(exported)
    upsert = spans["db upsert"]
    assert upsert.parent is not None and upsert.parent.span_id == record.get_span_context().span_id
    assert upsert.status.status_code is StatusCode.ERROR
    assert upsert.attributes is not None and upsert.attributes["db.operation.name"] == "upsert"
    assert any(event.name == "exception" for event in upsert.events)


def test_span_helper_runs_the_body_when_telemetry_itself_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> None:
        raise RuntimeError("exporter misconfigured")

    monkeypatch.setattr(tracing, "tracer", broken)
    ran = []
    with tracing.span("tokenise") as span:
        ran.append(span.get_span_context().is_valid)
    assert ran == [False]
    assert tracing.start_span("process y", parent=None).get_span_context().is_valid is False


def test_log_lines_inside_a_span_carry_its_trace_id(exported: InMemorySpanExporter) -> None:
    record = logging.LogRecord(
        "svc", logging.INFO, __file__, 1, "notification skipped task_id=%s", ("t-1",), None
    )
    text, json_format = TextFormatter("%(message)s"), JsonFormatter()
    assert "trace_id" not in text.format(record)
    with tracing.span("process z") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        assert text.format(record) == f"notification skipped task_id=t-1 trace_id={trace_id}"
        assert f'"trace_id": "{trace_id}"' in json_format.format(record)


def test_unsampled_parent_is_handed_on_instead_of_making_a_span() -> None:
    from conveyor.telemetry.tracing import remote_parent, unsampled_parent

    dropped = remote_parent({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"})
    kept = remote_parent({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    span = unsampled_parent(dropped)
    assert span is not None and not span.get_span_context().trace_flags.sampled
    assert format(span.get_span_context().span_id, "016x") == "cd" * 8  # the parent itself
    assert unsampled_parent(kept) is None
    assert unsampled_parent(None) is None


def test_record_under_an_unsampled_parent_reuses_it_and_its_handler_spans_stay_in_its_trace(
    exported: InMemorySpanExporter,
) -> None:
    dropped = tracing.remote_parent({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"})
    asked = []
    record = tracing.record_span(
        "process in", parent=dropped, attributes=lambda: asked.append(1) or {}
    )
    assert record is dropped and asked == []  # no span made, no attributes built
    headers = dict(tracing.inject(record))
    assert headers["traceparent"] == b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-00"
    token = tracing.activate(record)
    with tracing.span("classify") as handler:
        ctx = handler.get_span_context()
    tracing.deactivate(token)
    assert format(ctx.trace_id, "032x") == "ab" * 16 and not ctx.trace_flags.sampled
    assert exported.get_finished_spans() == ()


def test_record_span_is_a_consumer_child_of_the_previous_hop_with_all_its_attributes(
    exported: InMemorySpanExporter,
) -> None:
    hop = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    attributes = {"messaging.system": "kafka", "messaging.kafka.offset": 7, "ok": True}
    record = tracing.record_span(
        "process t",
        parent=tracing.remote_parent({"traceparent": hop, "tracestate": "v=1"}),
        attributes=lambda: attributes,
    )
    headers = {k: v.decode() for k, v in tracing.inject(record)}
    tracing.end_span(record)
    span = by_name(exported)["process t"]
    assert span.kind is SpanKind.CONSUMER and span.parent is not None
    assert span.parent.is_remote and format(span.parent.span_id, "016x") == hop[36:52]
    assert format(span.context.trace_id, "032x") == hop[3:35]
    assert dict(span.attributes or {}) == attributes
    assert headers["traceparent"] == tracing.traceparent_of(record)
    assert headers["traceparent"].startswith(f"00-{hop[3:35]}-") and headers["tracestate"] == "v=1"


def test_attributes_the_sdk_would_change_still_go_through_its_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_span_attribute_length=4))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    tracing.end_span(tracing.start_span("limited", parent=None, attributes={"a": "abcdefgh"}))
    tracing.end_span(tracing.start_span("listed", parent=None, attributes={"l": ["x", "y"]}))
    spans = by_name(exporter)
    assert dict(spans["limited"].attributes or {}) == {"a": "abcd"}
    assert dict(spans["listed"].attributes or {}) == {"l": ("x", "y")}
    provider.shutdown()


HEADERS = [
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",
    " \t00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\t ",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future-fields",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
    "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "-x" * 300,
    "",
]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("state", [None, "vendor=a,other=b", "not a list entry", "x" * 600])
def test_traceparent_is_read_as_the_w3c_propagator_reads_it(header: str, state: str | None) -> None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = (
        {"traceparent": header} if state is None else {"traceparent": header, "tracestate": state}
    )
    expected = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier))
    got = tracing.remote_parent(carrier)
    if not expected.get_span_context().is_valid:
        assert got is None
    else:
        assert got is not None and got.get_span_context() == expected.get_span_context()
        assert got.get_span_context().trace_state == expected.get_span_context().trace_state


@pytest.mark.parametrize("header", [*HEADERS, None])
def test_trace_id_of_names_the_trace_the_propagator_would_continue(header: str | None) -> None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": header} if header is not None else {}
    extracted = TraceContextTextMapPropagator().extract(carrier)
    ctx = trace.get_current_span(extracted).get_span_context()
    expected = f"{ctx.trace_id:032x}" if ctx.is_valid else None
    assert trace_id_of(header) == expected


def test_a_new_traceparent_is_valid_and_names_its_own_trace() -> None:
    first, second = tracing.new_traceparent(), tracing.new_traceparent()
    assert tracing.remote_span(first) is not None
    assert trace_id_of(first) == first[3:35] != trace_id_of(second)


def test_injected_headers_are_what_the_w3c_propagator_writes() -> None:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    for header, state in [(HEADERS[0], "vendor=a,other=b"), (HEADERS[1], None), (HEADERS[2], "")]:
        carrier = (
            {"traceparent": header}
            if state is None
            else {"traceparent": header, "tracestate": state}
        )
        span = trace.get_current_span(propagator.extract(carrier))
        expected: dict[str, str] = {}
        propagator.inject(expected, context=trace.set_span_in_context(span))
        assert {k: v.decode() for k, v in tracing.inject(span)} == expected
    assert tracing.inject(trace.INVALID_SPAN) == []


def test_batch_span_is_a_child_of_the_first_record_linked_to_the_others(
    exported: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "enabled", lambda: True)
    records = [tracing.start_span(f"process {i}", parent=None) for i in range(3)]
    batch = tracing.batch_span(
        "moderation batch", first=records[0], others=records[1:], attributes={"n": 3}
    )
    tracing.end_span(batch)
    span = by_name(exported)["moderation batch"]
    assert span.parent is not None
    assert span.parent.span_id == records[0].get_span_context().span_id
    linked = [link.context.span_id for link in span.links]
    assert linked == [record.get_span_context().span_id for record in records[1:]]
    assert dict(span.attributes or {}) == {"n": 3}
    dropped = tracing.remote_parent({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"})
    assert dropped is not None
    unkept = tracing.batch_span("b", first=dropped, others=records, attributes={"n": 4})
    assert not unkept.is_recording()
    assert format(unkept.get_span_context().trace_id, "032x") == "ab" * 16


def test_an_unsampled_parent_is_handed_on_unparsed_and_handler_spans_stay_in_its_trace(
    exported: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "_parent_based_sampler", True)
    unsampled = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"
    span = tracing.unsampled_remote({"traceparent": unsampled, "tracestate": "v=1"})
    assert isinstance(span, tracing.DeferredRemoteSpan) and not span.is_recording()
    assert span._parsed is None  # nothing parsed until the context is asked for
    assert tracing.carried({"traceparent": unsampled}, {}) == [("traceparent", unsampled.encode())]
    token = tracing.activate(span)
    with tracing.span("classify") as handler:
        ctx = handler.get_span_context()
    tracing.deactivate(token)
    assert format(ctx.trace_id, "032x") == "ab" * 16 and not ctx.trace_flags.sampled
    assert (
        span.get_span_context()
        == tracing.remote_parent({"traceparent": unsampled, "tracestate": "v=1"}).get_span_context()
    )  # type: ignore[union-attr]
    assert exported.get_finished_spans() == ()
    sampled = unsampled[:-2] + "01"
    assert tracing.unsampled_remote({"traceparent": sampled}) is None  # gets a span
    assert tracing.unsampled_remote({"traceparent": "00-" + "0" * 32 + unsampled[35:]}) is None
    assert tracing.unsampled_remote({"traceparent": unsampled.upper()}) is None  # not valid
    assert tracing.unsampled_remote({}) is None
    monkeypatch.setattr(tracing, "_parent_based_sampler", False)
    assert tracing.unsampled_remote({"traceparent": unsampled}) is None  # a child is sampled


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_are_exported_by_the_sdks_own_exporter_for_each_protocol(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    exporter = tracing.otlp_exporter()
    try:
        # Exactly the SDK's class: no subclass reaching into its private members.
        assert type(exporter) is (Grpc if protocol == "grpc" else Http)
    finally:
        exporter.shutdown()
