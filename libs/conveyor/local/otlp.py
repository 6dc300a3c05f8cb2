"""A small OTLP trace receiver on 127.0.0.1 for tests and benchmarks: OTLP/HTTP and OTLP/gRPC.

Point a service at it with `OTEL_EXPORTER_OTLP_ENDPOINT=<receiver.endpoint>` (HTTP, protobuf,
gzip or not) or `<receiver.grpc_endpoint>` with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`. Each
`ExportTraceServiceRequest` is decoded with the `opentelemetry-proto` messages into
`ReceivedSpan`s (hex ids, the resource's `service.name`, attributes as Python values), so a test
can check parentage and attributes the way a trace backend would show them. With
`keep_spans=False` it only counts spans (a benchmark's sink, cheap on a shared CPU). With
`defer_decode=True` an OTLP/HTTP body is only kept on receipt and decoded by `decode_pending()`:
a benchmark calls that outside its timed window, so parsing does not compete with the services
for the CPU (a production collector runs on another machine).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

TRACES_PATH = "/v1/traces"
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None  # None for a root span
    name: str
    kind: int  # OTLP SpanKind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    service: str  # the resource's service.name
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each link
    status_code: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)  # the resource's attributes


def value_of(value: AnyValue) -> Any:
    """An OTLP AnyValue as a plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value_of(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def decode_request(body: bytes) -> list[ReceivedSpan]:
    """The spans of one serialised ExportTraceServiceRequest."""
    return spans_of(_parse(body))


def _parse(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return request


def spans_of(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: value_of(kv.value) for kv in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        kind=span.kind,
                        service=service,
                        attributes={kv.key: value_of(kv.value) for kv in span.attributes},
                        links=tuple(
                            (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                        ),
                        status_code=span.status.code,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        resource=resource,
                    )
                )
    return out


def count_spans(request: ExportTraceServiceRequest) -> dict[str, int]:
    """Spans per resource `service.name`, without decoding the spans themselves."""
    out: dict[str, int] = {}
    for resource_spans in request.resource_spans:
        service = next(
            (
                kv.value.string_value
                for kv in resource_spans.resource.attributes
                if kv.key == "service.name"
            ),
            "",
        )
        spans = sum(len(ss.spans) for ss in resource_spans.scope_spans)
        out[service] = out.get(service, 0) + spans
    return out


class OtlpReceiver:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        grpc: bool = False,
        keep_spans: bool = True,
        defer_decode: bool = False,
    ) -> None:
        self.host = host
        self.keep_spans = keep_spans
        self.defer_decode = defer_decode
        self.span_count = 0
        self.span_count_by_service: dict[str, int] = {}
        self.requests = 0
        self.malformed = 0  # deferred bodies that did not decode (answered 200 on receipt)
        self.last_request_at = 0.0  # time.monotonic() of the latest export received
        self._spans: list[ReceivedSpan] = []
        self._pending: list[tuple[bytes, bool]] = []  # (body, gzip) kept by defer_decode
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer((host, 0), _http_handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="otlp-http", daemon=True
        )
        self._grpc: Any = None
        self._grpc_port = 0
        if grpc:
            self._grpc, self._grpc_port = _grpc_server(self, host)

    @property
    def endpoint(self) -> str:
        """OTLP/HTTP base URL (the exporter appends /v1/traces)."""
        return f"http://{self.host}:{self._http.server_address[1]}"

    @property
    def grpc_endpoint(self) -> str:
        if self._grpc is None:
            raise RuntimeError("receiver started without grpc=True")
        return f"http://{self.host}:{self._grpc_port}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        if self._grpc is not None:
            self._grpc.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=None)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def accept(self, request: ExportTraceServiceRequest) -> None:
        spans = spans_of(request) if self.keep_spans else []
        counts = count_spans(request)
        with self._lock:
            self.requests += 1
            self.last_request_at = time.monotonic()
            for service, n in counts.items():
                self.span_count += n
                self.span_count_by_service[service] = self.span_count_by_service.get(service, 0) + n
            self._spans.extend(spans)

    def keep(self, body: bytes, *, gzipped: bool) -> None:
        """Hold an undecoded OTLP/HTTP body for `decode_pending()` (with `defer_decode`)."""
        with self._lock:
            self._pending.append((body, gzipped))
            self.last_request_at = time.monotonic()

    def decode_pending(self) -> int:
        """Decode the bodies held so far, as `accept` would have on receipt; returns their spans."""
        with self._lock:
            pending, self._pending = self._pending, []
        before = self.span_count
        for body, gzipped in pending:
            try:
                self.accept(_parse(gzip.decompress(body) if gzipped else body))
            except Exception:
                with self._lock:
                    self.malformed += 1
        return self.span_count - before

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Spans grouped by trace id."""
        out: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans():
            out.setdefault(span.trace_id, []).append(span)
        return out

    def wait_for(self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> bool:
        """Poll until `done(spans)` or the deadline; returns whether it became true."""
        deadline = time.monotonic() + timeout_s
        while True:
            if done(self.spans()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != TRACES_PATH:
                return self._reply(404, b"")
            if "protobuf" not in self.headers.get("Content-Type", ""):
                return self._reply(415, b"")  # OTLP/JSON is not needed by Conveyor's exporters
            gzipped = self.headers.get("Content-Encoding", "") == "gzip"
            if receiver.defer_decode:
                receiver.keep(body, gzipped=gzipped)
                return self._reply(200, _EMPTY_RESPONSE)
            try:
                request = _parse(gzip.decompress(body) if gzipped else body)
            except Exception:
                return self._reply(400, b"")
            receiver.accept(request)
            self._reply(200, _EMPTY_RESPONSE)

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return _Handler


def _grpc_server(receiver: OtlpReceiver, host: str) -> tuple[Any, int]:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as service

    class _Servicer(service.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC naming)
            receiver.accept(request)
            return ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    service.add_TraceServiceServicer_to_server(_Servicer(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{host}:0")
    return server, port
