"""OTLP span export with the request body written straight to protobuf wire format.

The SDK's OTLP encoder builds a protobuf object per span, per attribute and per value, and hashes
the resource (a JSON dump) once per span: ~390k instructions a span (75-130 µs on the 2-core
development machine), most of what a stage hop costs without tracing, spent in the export thread
on the service's own cores. `encode_request` writes the same `ExportTraceServiceRequest` bytes
directly in ~146k: the same grouping by resource and instrumentation scope, the same fields,
flags and attribute value types, byte for byte (tests/unit/test_spanexport.py).

`otlp_exporter` returns the SDK's own OTLP exporters (HTTP or gRPC, configured by the standard
`OTEL_EXPORTER_OTLP_*` variables: endpoint, headers, timeout, compression, certificates), each
with only the encoding step replaced. A batch the fast path cannot encode falls back to the
SDK's encoder, so a span is never lost to this module.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

log = logging.getLogger(__name__)

_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200  # OTLP SpanFlags
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT64 = (1 << 64) - 1
_SMALL = [bytes((n,)) for n in range(128)]
_KEY_CACHE_LIMIT = 1024  # distinct attribute keys kept encoded (a service uses a few dozen)
_keys: dict[str, bytes] = {}
# OTLP's SpanKind counts from UNSPECIFIED = 0; a status code of 0 (unset) is left out.
_KINDS = {kind: b"\x30" + _SMALL[kind.value + 1] for kind in SpanKind}
_CODES = {code: b"\x18" + _SMALL[code.value] if code.value else b"" for code in StatusCode}
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_double = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return tag + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    """The body of an AnyValue, with the SDK encoder's type order (bool before int)."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", value.encode())
    if kind is int:
        return _int(value)
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return _int(int(value))
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(v)) for v in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", pairs)
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _int(value: int) -> bytes:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} does not fit an int64 attribute")
    return b"\x18" + _varint(value & _UINT64)


def _key_value(key: str, value: Any) -> bytes:
    return _key(key) + _field(b"\x12", _value(value))


def _key(key: str) -> bytes:
    head = _keys.get(key)
    if head is None:
        head = _field(b"\x0a", key.encode()) if key else b""
        if len(_keys) < _KEY_CACHE_LIMIT:
            _keys[key] = head
    return head


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> list[bytes]:
    out = []
    for key, value in (attributes or {}).items():
        if type(value) is str and len(value) < 40:
            # Most attributes are short strings: every length below fits one varint byte.
            data = value.encode()
            head = _keys.get(key) or _key(key)
            size = len(head) + len(data) + 4
            if size < 128:
                small = _SMALL
                parts = (tag, small[size], head, b"\x12", small[len(data) + 2], b"\x0a")
                out.append(b"".join((*parts, small[len(data)], data)))
                continue
        try:
            pair = _key_value(key, value)
        except Exception as exc:  # the SDK encoder also drops just the one attribute
            log.exception("failed to encode attribute key=%s: %s", key, exc)
            continue
        out.append(tag + _varint(len(pair)) + pair)
    return out


def _flags(parent: Any) -> bytes:
    remote = parent is not None and parent.is_remote
    return _fixed32(_HAS_IS_REMOTE | _IS_REMOTE if remote else _HAS_IS_REMOTE)


def _ids(ctx: Any) -> list[bytes]:
    """Fields 1 and 2 of a span or a link: trace id (16 bytes), span id (8 bytes)."""
    return [
        b"\x0a\x10",
        ctx.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        ctx.span_id.to_bytes(8, "big"),
    ]


def _span(span: ReadableSpan) -> bytes:
    ctx = span.context
    out = _ids(ctx)
    if ctx.trace_state:
        out.append(
            _field(b"\x1a", ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode())
        )
    parent = span.parent
    if parent is not None:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    if span.name:
        out.append(_field(b"\x2a", span.name.encode()))
    out.append(_KINDS[span.kind])
    if span.start_time:
        out += (b"\x39", _fixed64(span.start_time))
    if span.end_time:
        out += (b"\x41", _fixed64(span.end_time))
    out += _attributes(b"\x4a", span.attributes)
    if span.dropped_attributes:
        out += (b"\x50", _varint(span.dropped_attributes))
    out += (_field(b"\x5a", _event(event)) for event in span.events)
    if span.dropped_events:
        out += (b"\x60", _varint(span.dropped_events))
    out += (_field(b"\x6a", _link(link)) for link in span.links)
    if span.dropped_links:
        out += (b"\x70", _varint(span.dropped_links))
    out.append(_field(b"\x7a", _status(span)))
    out += (b"\x85\x01", _flags(parent))
    return b"".join(out)


def _event(event: Any) -> bytes:
    out = [b"\x09" + _fixed64(event.timestamp)] if event.timestamp else []
    if event.name:
        out.append(_field(b"\x12", event.name.encode()))
    out += _attributes(b"\x1a", event.attributes)
    if event.dropped_attributes:
        out += (b"\x20", _varint(event.dropped_attributes))
    return b"".join(out)


def _link(link: Any) -> bytes:
    ctx = link.context
    out = _ids(ctx)
    out += _attributes(b"\x22", link.attributes)
    if link.dropped_attributes:
        out += (b"\x28", _varint(link.dropped_attributes))
    out += (b"\x35", _flags(ctx))
    return b"".join(out)


def _status(span: ReadableSpan) -> bytes:
    status = span.status
    out = _field(b"\x12", status.description.encode()) if status.description else b""
    return out + _CODES[status.status_code]


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    out = [_field(b"\x0a", scope.name.encode())] if scope.name else []
    if scope.version:
        out.append(_field(b"\x12", scope.version.encode()))
    out += _attributes(b"\x1a", scope.attributes)
    return b"".join(out)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized `ExportTraceServiceRequest` of `spans`: what the SDK's `encode_spans`
    builds, grouped by resource then instrumentation scope in order of first appearance."""
    groups: dict[tuple[int, int], list[bytes]] = {}  # by object identity: no hashing per span
    tree: dict[Any, dict[Any, list[bytes]]] = {}  # equal resources (and scopes) share a group
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope or None
        ids = (id(resource), id(scope))
        out = groups.get(ids)
        if out is None:
            out = groups[ids] = tree.setdefault(resource, {}).setdefault(scope, [])
        out.append(_field(b"\x12", _span(span)))
    body = []
    for resource, scopes in tree.items():
        parts = [_field(b"\x0a", b"".join(_attributes(b"\x0a", resource.attributes)))]
        for scope, encoded in scopes.items():
            scope_spans = [_field(b"\x0a", _scope(scope)), *encoded]
            if scope is not None and scope.schema_url:
                scope_spans.append(_field(b"\x1a", scope.schema_url.encode()))
            parts.append(_field(b"\x12", b"".join(scope_spans)))
        if resource.schema_url:
            parts.append(_field(b"\x1a", resource.schema_url.encode()))
        body.append(_field(b"\x0a", b"".join(parts)))
    return b"".join(body)


def _encoded(spans: Sequence[ReadableSpan]) -> bytes:
    try:
        return encode_request(spans)
    except Exception:
        log.exception("fast span encoding failed spans=%d; using the SDK encoder", len(spans))
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        body: bytes = encode_spans(spans).SerializePartialToString()
        return body


def otlp_exporter(protocol: str) -> Any:
    """The SDK's OTLP span exporter for `protocol` (`grpc`, else HTTP/protobuf), encoding with
    `encode_request`; the SDK's exporter unchanged if this version of it cannot be adapted."""
    try:
        return _grpc_exporter() if protocol == "grpc" else _http_exporter()
    except Exception:
        log.exception("fast OTLP exporter unavailable protocol=%s; using the SDK's", protocol)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def _http_exporter() -> Any:
    """OTLP/HTTP: the SDK exporter's `export`, step for step, with the body from `_encoded`.

    Written after opentelemetry-exporter-otlp-proto-http 1.45.2 (pinned): on an upgrade, compare
    with its `export`; the members it needs are checked here, else the SDK's exporter is used.
    """
    from opentelemetry.exporter.otlp.proto.http._common import (
        RequestPayloadTooLargeError,
        _is_request_too_large,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class HttpSpanExporter(OTLPSpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            if self._shutdown:
                log.warning("Exporter already shutdown, ignoring batch")
                return SpanExportResult.FAILURE
            with self._metrics.export_operation(len(spans)) as result:
                body = _encoded(spans)
                limit = self._max_request_size
                if _is_request_too_large(body, limit):
                    log.warning(
                        "dropping span batch bytes=%d max_request_size=%d", len(body), limit
                    )
                    result.error = RequestPayloadTooLargeError(
                        f"Serialized span request size {len(body)} bytes exceeds "
                        f"max_request_size {limit} bytes."
                    )
                    return SpanExportResult.FAILURE
                sent = self._client.export(body)
                if not sent.success:
                    result.error = sent.error
                    if sent.status_code is not None:
                        result.error_attrs = {"http.response.status_code": sent.status_code}
                    return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    exporter = HttpSpanExporter()
    missing = [
        n
        for n in ("_shutdown", "_metrics", "_max_request_size", "_client")
        if not hasattr(exporter, n)
    ]
    if missing:
        raise AttributeError(f"OTLP/HTTP exporter lacks {missing}")
    return exporter


def _grpc_exporter() -> Any:
    """OTLP/gRPC: the SDK exporter, whose request message is parsed from `_encoded`'s bytes
    (protobuf's C parser takes ~1 µs a span, a small part of what building it in Python takes)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    class GrpcSpanExporter(OTLPSpanExporter):
        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(
                _encoded(data)
            )
            return request

    return GrpcSpanExporter()
