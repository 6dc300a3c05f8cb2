"""The test/bench OTLP receiver: decoding on receipt, or holding bodies until `decode_pending()`."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from conveyor.local.otlp import OtlpReceiver


def export_body(spans: int, service: str = "conveyor-probe") -> bytes:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", service
    scope = resource_spans.scope_spans.add()
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id = bytes(15) + b"\x01"
        span.span_id = bytes(7) + bytes([i + 1])
        span.name = f"span {i}"
    return request.SerializeToString()


def post(receiver: OtlpReceiver, body: bytes, *, gzipped: bool = False) -> int:
    headers = {"Content-Type": "application/x-protobuf"}
    if gzipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    request = urllib.request.Request(
        receiver.endpoint + "/v1/traces", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def deferred() -> Iterator[OtlpReceiver]:
    with OtlpReceiver(keep_spans=False, defer_decode=True) as otlp:
        yield otlp


def test_deferred_bodies_are_counted_only_when_decoded(deferred: OtlpReceiver) -> None:
    assert post(deferred, export_body(3)) == 200
    assert post(deferred, export_body(2, "conveyor-notify"), gzipped=True) == 200
    assert deferred.span_count == 0 and deferred.requests == 0
    assert deferred.last_request_at > 0
    assert deferred.decode_pending() == 5
    assert deferred.span_count == 5 and deferred.requests == 2
    assert deferred.span_count_by_service == {"conveyor-probe": 3, "conveyor-notify": 2}
    assert deferred.decode_pending() == 0  # each body is decoded once


def test_deferred_malformed_body_is_counted_at_decode(deferred: OtlpReceiver) -> None:
    assert post(deferred, b"\xff\xff not protobuf") == 200
    assert post(deferred, export_body(1)) == 200
    assert deferred.decode_pending() == 1
    assert deferred.malformed == 1


def test_default_receiver_decodes_on_receipt_and_rejects_malformed_bodies() -> None:
    with OtlpReceiver() as otlp:
        assert post(otlp, export_body(2), gzipped=True) == 200
        assert otlp.span_count == 2 and [s.name for s in otlp.spans()] == ["span 0", "span 1"]
        assert post(otlp, b"\xff\xff not protobuf") == 400
        assert otlp.decode_pending() == 0 and otlp.span_count == 2
