"""OpenTelemetry tracing across Kafka hops: one trace id from submit to notify.

Each record's consume span is a *child* of the context in its `traceparent` Kafka header (the
previous hop), falling back to the CloudEvents `ce_traceparent` attribute (the starting trace),
so one trace covers the whole task, retries included. Outputs carry the consume span's context
in `traceparent`/`tracestate` headers.

The SDK is installed only when an exporter is configured by the standard variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, protocol from
`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` default, or `grpc`) and neither
`OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` is set. Without it the API's no-op
tracer still propagates the incoming context unchanged, at almost no cost. The sampler honours
`OTEL_TRACES_SAMPLER` (e.g. `parentbased_traceidratio`). Telemetry never raises into the
pipeline: every call here logs and swallows its own failures.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "conveyor"
_enabled = False
_tracer: trace.Tracer | None = None  # the SDK's, cached: get_tracer builds a new one per call


def tracing_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def init_tracing(service: str) -> bool:
    """Install the SDK with an OTLP exporter when configured; return whether it is on."""
    global _enabled, _tracer
    if _enabled or not tracing_configured():
        return _enabled
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", f"conveyor-{service}")}
        )
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(_exporter()))
        trace.set_tracer_provider(provider)
        _tracer = provider.get_tracer(_TRACER_NAME)
        _enabled = True
    except Exception:
        log.exception("tracing setup failed service=%s; continuing without export", service)
    return _enabled


def _exporter() -> Any:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter()


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    try:
        shutdown = getattr(provider, "shutdown", None)
        if shutdown is not None:
            shutdown()
    except Exception:
        log.exception("tracing shutdown failed")


def enabled() -> bool:
    """Whether the SDK is installed (spans are made and exported, subject to the sampler)."""
    return _enabled


def new_traceparent() -> str:
    """A fresh, sampled W3C traceparent, for work that starts a trace while the SDK is off:
    the task still gets one trace id through every hop (stored, shown by `conveyor trace`)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _parent_based() -> bool:
    return os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").startswith("parentbased")


def unsampled_parent(parent: Context | None) -> Span | None:
    """The parent's (non-recording) span when a parent-based sampler would drop the child.

    Making, sampling out and ending a span costs ~20 µs; handing on the parent's context costs
    nothing, and handler spans made under it are dropped by the same sampler rule.
    """
    if parent is None or not _parent_based():
        return None
    span = trace.get_current_span(parent)
    ctx = span.get_span_context()
    return span if ctx.is_valid and not ctx.trace_flags.sampled else None


def tracer() -> trace.Tracer:
    return _tracer if _tracer is not None else trace.get_tracer(_TRACER_NAME)


def carried(headers: Mapping[str, str], extensions: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """The next hop's trace headers when the SDK is off: the incoming context, unchanged.

    What injecting the no-op span of `parent_context(headers)` would give, without the cost of
    parsing and re-formatting it (~20 µs a record): the `traceparent` header, else the
    CloudEvents attribute (header, or in the body of a structured-mode event).
    """
    if "traceparent" in headers:
        parent, state = headers["traceparent"], headers.get("tracestate")
    elif "ce_traceparent" in headers:
        parent, state = headers["ce_traceparent"], headers.get("ce_tracestate")
    elif "traceparent" in extensions:
        parent, state = extensions["traceparent"], extensions.get("tracestate")
    else:
        return []
    out = [("traceparent", parent.encode())]
    if state:
        out.append(("tracestate", state.encode()))
    return out


def parent_context(headers: Mapping[str, str]) -> Context | None:
    """The incoming context: the `traceparent` header, else the CloudEvents attribute."""
    if "traceparent" in headers:
        carrier = {"traceparent": headers["traceparent"]}
        if "tracestate" in headers:
            carrier["tracestate"] = headers["tracestate"]
    elif "ce_traceparent" in headers:
        carrier = {"traceparent": headers["ce_traceparent"]}
        if "ce_tracestate" in headers:
            carrier["tracestate"] = headers["ce_tracestate"]
    else:
        return None
    try:
        return _PROPAGATOR.extract(carrier)
    except Exception:
        log.debug("bad traceparent header ignored")
        return None


def start_span(
    name: str,
    *,
    parent: Context | None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] | None = None,
) -> Span:
    try:
        # An explicit empty Context makes a record without trace context a new root, rather
        # than a child of whatever span happens to be current in the loop.
        return tracer().start_span(
            name,
            context=parent if parent is not None else Context(),
            kind=kind,
            attributes=dict(attributes or {}),
            links=links,
        )
    except Exception:
        log.exception("span start failed name=%s", name)
        return trace.INVALID_SPAN


def inject(span: Span) -> list[tuple[str, bytes]]:
    """`traceparent`/`tracestate` headers naming `span` as the parent of the next hop."""
    carrier: dict[str, str] = {}
    try:
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    except Exception:
        log.exception("trace inject failed")
    return [(key, value.encode()) for key, value in carrier.items()]


def trace_id_hex(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def traceparent_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def end_span(span: Span, error: BaseException | None = None) -> None:
    try:
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        span.end()
    except Exception:
        log.exception("span end failed")


def activate(span: Span) -> object:
    """Make `span` current (handler spans nest inside it); pass the token to `deactivate`."""
    try:
        return otel_context.attach(trace.set_span_in_context(span))
    except Exception:
        log.debug("context attach failed")
        return None


def deactivate(token: object) -> None:
    try:
        otel_context.detach(token)  # type: ignore[arg-type]
    except Exception:
        log.debug("context detach failed")


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A handler-level span, child of the current one (the record's or the batch's span).

    `with tracing.span("db upsert", {"db.system.name": "sqlite"}):` — an exception from the
    body is recorded on the span and re-raised unchanged; a failure of telemetry itself is
    logged and swallowed, so the body runs whether or not the span could be made.
    """
    try:
        current = tracer().start_span(name, attributes=dict(attributes or {}))
    except Exception:
        log.exception("span start failed name=%s", name)
        current = trace.INVALID_SPAN
    token = activate(current)
    try:
        yield current
    except BaseException as exc:
        end_span(current, exc)
        raise
    else:
        end_span(current)
    finally:
        deactivate(token)


def current_trace_id() -> str | None:
    """The trace id of the current span (for log lines), or None outside any trace."""
    try:
        ctx = trace.get_current_span().get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None
    except Exception:
        return None


def inject_current() -> dict[str, str]:
    """`traceparent`/`tracestate` of the current span, e.g. for an outgoing HTTP request."""
    carrier: dict[str, str] = {}
    try:
        _PROPAGATOR.inject(carrier)
    except Exception:
        log.exception("trace inject failed")
    return carrier
