"""The OTLP request bytes written by `spanexport` are the SDK encoder's, for every kind of span.

Spans come from real SDK providers (two resources, three instrumentation scopes) with every
attribute value type, events, links, statuses, remote and local parents and trace state, so a
field the fast encoder forgot or wrote differently shows up as a difference in the bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from conveyor.telemetry import spanexport
from conveyor.telemetry.spanexport import encode_request

ATTRIBUTES = {
    "s": "é, not ascii",
    "long": "x" * 300,
    "empty": "",
    "neg": -5,
    "zero": 0,
    "big": 2**62,
    "f": 1.5,
    "no": False,
    "yes": True,
    "strs": ["a", "b"],
    "ints": (1, -2),
    "raw": b"\x00\x01",
}


@pytest.fixture
def spans() -> Iterator[list[ReadableSpan]]:
    exporter = InMemorySpanExporter()
    first = TracerProvider(resource=Resource.create({"service.name": "a", "n": 3}))
    second = TracerProvider(resource=Resource.create({"service.name": "b"}, "https://s/1"))
    for provider in (first, second):
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    conveyor, other = first.get_tracer("conveyor"), first.get_tracer("x", "1.2", "https://s/2")
    state = TraceState([("a", "1"), ("b", "2")])
    remote = NonRecordingSpan(SpanContext(0xABC, 0xDEF, True, TraceFlags(1), state))
    record = conveyor.start_span(
        "process t", set_span_in_context(remote), SpanKind.CONSUMER, ATTRIBUTES
    )
    record.add_event("retry", {"attempt": 2})
    record.record_exception(ValueError("boom"))
    record.set_status(Status(StatusCode.ERROR, "ValueError"))
    record.end()
    links = [Link(record.get_span_context(), {"l": 1}), Link(SpanContext(1, 2, True))]
    child = other.start_span("batch", set_span_in_context(record), links=links)
    child.set_status(StatusCode.OK)
    child.end()
    second.get_tracer("conveyor").start_span("", kind=SpanKind.PRODUCER).end()
    conveyor.start_span("root").end()
    local = NonRecordingSpan(SpanContext(5, 6, False, TraceFlags(1)))
    conveyor.start_span("server", set_span_in_context(local), SpanKind.SERVER).end()
    yield list(exporter.get_finished_spans())
    for provider in (first, second):
        provider.shutdown()


def test_request_bytes_are_the_sdk_encoders(spans: list[ReadableSpan]) -> None:
    assert len(spans) == 5
    assert encode_request(spans) == encode_spans(spans).SerializePartialToString()
    assert encode_request(spans[:1]) == encode_spans(spans[:1]).SerializePartialToString()
    assert encode_request([]) == b""


def test_an_attribute_that_cannot_be_encoded_is_dropped_alone(spans: list[ReadableSpan]) -> None:
    record = spans[0]
    broken = ReadableSpan(
        name=record.name,
        context=record.context,
        parent=record.parent,
        resource=record.resource,
        attributes={"fine": "kept", "huge": 2**70, "after": 1},
        kind=record.kind,
        start_time=record.start_time,
        end_time=record.end_time,
        instrumentation_scope=record.instrumentation_scope,
    )
    assert encode_request([broken]) == encode_spans([broken]).SerializePartialToString()


def test_a_batch_the_fast_path_cannot_encode_goes_through_the_sdk_encoder(
    spans: list[ReadableSpan], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_spans: object) -> bytes:
        raise RuntimeError("unexpected span shape")

    monkeypatch.setattr(spanexport, "encode_request", broken)
    assert spanexport._encoded(spans) == encode_spans(spans).SerializePartialToString()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_the_exporter_for_each_protocol_is_the_sdks_with_the_fast_encoding(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    exporter = spanexport.otlp_exporter(protocol)
    try:
        assert isinstance(exporter, Grpc if protocol == "grpc" else Http)
        assert type(exporter).__module__ == spanexport.__name__  # not the SDK's own, unadapted
    finally:
        exporter.shutdown()
