"""Tracing helpers without a broker: parentage across a Kafka hop, handler spans, log lines.

Spans are recorded by an in-memory SDK provider patched into `tracing.tracer` for one test, so
the process-wide tracer provider (and every other test) stays untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor.telemetry import tracing
from conveyor.telemetry.logging import JsonFormatter, TextFormatter


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
    from conveyor.telemetry.tracing import parent_context, unsampled_parent

    dropped = parent_context({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-00"})
    kept = parent_context({"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"})
    span = unsampled_parent(dropped)
    assert span is not None and not span.get_span_context().trace_flags.sampled
    assert format(span.get_span_context().span_id, "016x") == "cd" * 8  # the parent itself
    assert unsampled_parent(kept) is None
    assert unsampled_parent(None) is None
