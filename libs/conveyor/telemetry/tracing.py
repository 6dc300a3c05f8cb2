"""OpenTelemetry tracing across Kafka hops: one trace id from submit to notify.

Each record's CONSUMER span is a *child* of the context in its `traceparent` Kafka header (the
previous hop's PRODUCER span), falling back to the CloudEvents `ce_traceparent` attribute (the
starting trace), so one trace covers the whole task, retries included. Each emitted record gets
a PRODUCER span (`producer_span`), child of the consume span, whose context its
`traceparent`/`tracestate` headers carry (OpenTelemetry messaging conventions).

The SDK is installed only when an exporter is configured by the standard variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, protocol from
`OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` default, or `grpc`) and neither
`OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` is set. Without it the API's no-op
tracer still propagates the incoming context unchanged, at almost no cost. The sampler honours
`OTEL_TRACES_SAMPLER` (e.g. `parentbased_traceidratio`). Telemetry never raises into the
pipeline: every call here logs and swallows its own failures.

Per record this costs what the SDK's span costs and little more: headers are read and written by
`traceparent` (not the propagator), a record whose parent was sampled out gets no span of its
own, and spans are exported by the SDK's own OTLP exporter (public API only).
"""

from __future__ import annotations

import logging
import os
import platform
import secrets
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)

from conveyor.telemetry.traceparent import (
    format_trace_id,
    format_traceparent,
    format_tracestate,
    is_unsampled,
    parse,
)

log = logging.getLogger(__name__)
_TRACER_NAME = "conveyor"
_enabled = False
_tracer: trace.Tracer | None = None  # the SDK's, cached: get_tracer builds a new one per call
# What the installed sampler does, read once (from the environment until the SDK is installed):
# whether it drops the child of an unsampled parent, and whether it is not one of the SDK's own
# kinds (which decide on the trace id and the parent alone), so may look at attributes and links.
_parent_based_sampler: bool | None = None
_custom_sampler = False
# The latest batch span made on each thread and its records' spans, in order (`batch_records`).
_batches = threading.local()


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

        provider = TracerProvider(resource=Resource.create(resource_attributes(service)))
        provider.add_span_processor(BatchSpanProcessor(otlp_exporter()))
        trace.set_tracer_provider(provider)
        _tracer = provider.get_tracer(_TRACER_NAME)
        _read_sampler(provider.sampler)
        _enabled = True
    except Exception:
        log.exception("tracing setup failed service=%s; continuing without export", service)
    return _enabled


def instance_id() -> str:
    """This process's identity: `CONVEYOR_INSTANCE_ID` (a pod name), else host and pid. The
    stage's Kafka client id and the `service.instance.id` resource attribute both use it."""
    return os.environ.get("CONVEYOR_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"


def resource_attributes(service: str) -> dict[str, str]:
    """The resource: service name, instance and host. `OTEL_RESOURCE_ATTRIBUTES` may set any
    of them except `service.name`, which `OTEL_SERVICE_NAME` sets (the SDK's own precedence)."""
    ours = {
        "service.name": os.environ.get("OTEL_SERVICE_NAME", f"conveyor-{service}"),
        "service.namespace": "conveyor",
        "service.instance.id": instance_id(),
        "host.name": socket.gethostname(),
        "host.arch": platform.machine().lower(),
    }
    given = _resource_env()
    return {**ours, **{k: v for k, v in given.items() if k != "service.name"}}


def _resource_env() -> dict[str, str]:
    """`OTEL_RESOURCE_ATTRIBUTES` (`key=value,...`, values percent-encoded), as the SDK reads it."""
    from urllib.parse import unquote

    out = {}
    for pair in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(value.strip())
    return out


def otlp_exporter() -> Any:
    """The SDK's own OTLP span exporter for the configured protocol (`grpc`, else HTTP/protobuf),
    configured by the standard `OTEL_EXPORTER_OTLP_*` variables. Conveyor once wrote the OTLP
    bytes itself (~3x cheaper per span) through the exporter's private members; an SDK upgrade
    could break that silently, so export costs what the SDK's encoder costs
    (docs/performance.md)."""
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    return Http()


def _read_sampler(sampler: Any) -> None:
    """Remember what the SDK's sampler (from `OTEL_TRACES_SAMPLER`) does with parents, and
    whether it is one of the SDK's own: the hot path asks a flag, not the environment."""
    from opentelemetry.sdk.trace.sampling import ParentBased, StaticSampler, TraceIdRatioBased

    global _parent_based_sampler, _custom_sampler
    _parent_based_sampler = isinstance(sampler, ParentBased)
    _custom_sampler = not isinstance(sampler, (ParentBased, StaticSampler, TraceIdRatioBased))


def flush_tracing(timeout_s: float = 10.0) -> None:
    """Export the spans ended so far (a short-lived process, e.g. `conveyor submit`)."""
    provider = trace.get_tracer_provider()
    try:
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            force_flush(int(timeout_s * 1000))
    except Exception:
        log.exception("tracing flush failed")


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
    """A fresh W3C traceparent, for work that starts a trace while the SDK is off: the task
    still gets one trace id through every hop (stored, shown by `conveyor trace`). Its sampled
    flag is what the configured root sampler (`OTEL_TRACES_SAMPLER`, `..._ARG`) decides for
    that trace id, so traced services downstream keep the configured share, not every task."""
    trace_id = secrets.randbits(128) or 1
    sampled = trace_id & _RATIO_MASK < _root_bound()
    flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
    span_id = secrets.randbits(64) or 1
    return format_traceparent(SpanContext(trace_id, span_id, False, TraceFlags(flags)))


_RATIO_MASK = (1 << 64) - 1  # TraceIdRatioBased decides on the trace id's low 64 bits


def _root_bound() -> int:
    """The bound `TraceIdRatioBased` would compare a new root's trace id with."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name.endswith("always_off"):
        return 0
    rate = 1.0
    if name.endswith("traceidratio"):
        try:
            rate = min(max(float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")), 0.0), 1.0)
        except ValueError:
            rate = 1.0  # the SDK's default for an unreadable ratio
    return round(rate * (_RATIO_MASK + 1))


def _parent_based() -> bool:
    global _parent_based_sampler
    if _parent_based_sampler is None:
        sampler = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        _parent_based_sampler = sampler.startswith("parentbased")
    return _parent_based_sampler


def unsampled_parent(parent: Span | None) -> Span | None:
    """`parent` itself when a parent-based sampler would drop its child, else None.

    Making, sampling out and ending a span costs ~20 µs; handing on the parent's context costs
    nothing: the next hop gets the incoming `traceparent` unchanged, and handler spans made
    under it are dropped by the same sampler rule (and keep its trace id, not a new one).
    """
    if parent is None or not _parent_based():
        return None
    ctx = parent.get_span_context()
    return parent if ctx.is_valid and not ctx.trace_flags.sampled else None


class DeferredRemoteSpan(NonRecordingSpan):
    """The unsampled remote parent a `traceparent` names, parsed only if its context is asked
    for (a handler span made under it, a log line's trace id). The next hop gets the incoming
    header as it is (`carried`), so most unsampled records never parse it at all."""

    def __init__(self, traceparent: str, tracestate: str | None) -> None:
        self._header = traceparent
        self._state = tracestate
        self._parsed: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        if self._parsed is None:
            self._parsed = parse(self._header, self._state) or INVALID_SPAN_CONTEXT
        return self._parsed

    def __repr__(self) -> str:
        return f"DeferredRemoteSpan({self._header!r})"


def unsampled_remote(headers: Mapping[str, str]) -> Span | None:
    """The incoming parent as a `DeferredRemoteSpan` when it is unsampled and a parent-based
    sampler would drop its child (the record then gets no span of its own); else None."""
    if "traceparent" in headers:
        parent, state = headers["traceparent"], headers.get("tracestate")
    elif "ce_traceparent" in headers:
        parent, state = headers["ce_traceparent"], headers.get("ce_tracestate")
    else:
        return None
    if not _parent_based() or not is_unsampled(parent):
        return None
    return DeferredRemoteSpan(parent, state)


def record_span(
    name: str, *, parent: Span | None, attributes: Callable[[], Mapping[str, Any]]
) -> Span:
    """A record's CONSUMER span, child of `parent` (the previous hop); `parent` itself when
    the sampler would drop that child, in which case `attributes` is never called."""
    unsampled = unsampled_parent(parent)
    if unsampled is not None:
        return unsampled
    return start_span(
        name, parent=context_of(parent), kind=SpanKind.CONSUMER, attributes=attributes()
    )


def producer_span(parent: Span, topic: str) -> Span:
    """A `create <topic>` PRODUCER span, child of `parent`, for one record about to be sent:
    the next hop's CONSUMER span is its child (OpenTelemetry messaging conventions).

    It ends at once: it marks the record's creation, so a consumer that starts long after
    never lies inside a parent that ended before it (what Jaeger reports as clock skew). Made
    only under a recording `parent`, so an unsampled record still costs nothing, and with the
    conventions' required attributes only, one constant mapping per topic (the message id and
    key are on the consumer's span): a sampled record pays for one more span start and end.
    """
    cached = _producers.get(topic)
    if cached is None:
        cached = (
            f"create {topic}",
            {
                "messaging.system": "kafka",
                "messaging.operation.type": "create",
                "messaging.operation.name": "create",
                "messaging.destination.name": topic,
            },
        )
        if len(_producers) < _PRODUCER_CACHE_LIMIT:
            _producers[topic] = cached
    name, attributes = cached
    span = start_span(
        name, parent=context_of(parent), kind=SpanKind.PRODUCER, attributes=attributes
    )
    end_span(span)
    return span


_PRODUCER_CACHE_LIMIT = 256  # topics a stage emits to: outputs, lanes, status (a dozen)
_producers: dict[str, tuple[str, Mapping[str, Any]]] = {}


def server_attributes(bootstrap: str) -> dict[str, Any]:
    """`server.address`/`server.port` of the first bootstrap broker (`host:port,...`)."""
    first = bootstrap.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    host, sep, port = first.rpartition(":")
    if not sep:
        return {"server.address": first} if first else {}
    out: dict[str, Any] = {"server.address": host.strip("[]")}
    if port.isdigit():
        out["server.port"] = int(port)
    return out


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


def remote_span(traceparent: str, tracestate: str | None = None) -> Span | None:
    """The (non-recording) remote span a W3C `traceparent` names; None if it is not valid."""
    try:
        ctx = parse(traceparent, tracestate)
    except Exception:
        log.debug("bad traceparent header ignored")
        return None
    return NonRecordingSpan(ctx) if ctx is not None else None


def remote_parent(headers: Mapping[str, str]) -> Span | None:
    """The incoming context as a remote span: the `traceparent` header, else the CloudEvents
    attribute (`ce_traceparent`); None when there is none or it is not valid."""
    if "traceparent" in headers:
        return remote_span(headers["traceparent"], headers.get("tracestate"))
    if "ce_traceparent" in headers:
        return remote_span(headers["ce_traceparent"], headers.get("ce_tracestate"))
    return None


def context_of(parent: Span | None) -> Context:
    """A context holding only `parent`: an empty one makes a root span."""
    return trace.set_span_in_context(parent, Context()) if parent is not None else Context()


def parent_context(headers: Mapping[str, str]) -> Context | None:
    """The incoming context: the `traceparent` header, else the CloudEvents attribute; None
    without either, an empty context (a new root) when the header is not valid."""
    if "traceparent" not in headers and "ce_traceparent" not in headers:
        return None
    return context_of(remote_parent(headers))


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
        context = parent if parent is not None else Context()
        if not attributes or _custom_sampler:
            return tracer().start_span(
                name, context=context, kind=kind, attributes=attributes, links=links
            )
        # The built-in samplers never look at attributes: set them only on a span the
        # sampler kept (a dropped span would check and discard every one of them).
        span = tracer().start_span(name, context=context, kind=kind, links=links)
        if span.is_recording():
            span.set_attributes(attributes)
        return span
    except Exception:
        log.exception("span start failed name=%s", name)
        return trace.INVALID_SPAN


def batch_span(
    name: str, *, first: Span, others: Sequence[Span], attributes: Mapping[str, Any]
) -> Span:
    """A batch handler's span: child of the first record's span, linked to the others'.

    The links (~4 µs a record, each validated by the SDK) are added only to a span the sampler
    kept: under ratio sampling most batch spans are dropped. A sampler that may look at links
    gets them at the start instead.
    """
    span = _batch_span(name, first=first, others=others, attributes=attributes)
    _batches.latest = (span, (first, *others))
    return span


def batch_records() -> tuple[Span, ...]:
    """The spans of the records of the batch whose span is current, in the batch's order.

    A batch handler that calls out per record (notify's webhooks) makes each call's span a
    child of its own record's span, so every task's trace stays its own; empty outside a batch.
    """
    latest: tuple[Span, tuple[Span, ...]] | None = getattr(_batches, "latest", None)
    if latest is None or latest[0] is not trace.get_current_span():
        return ()
    return latest[1]


def _batch_span(
    name: str, *, first: Span, others: Sequence[Span], attributes: Mapping[str, Any]
) -> Span:
    parent = context_of(first)
    if not enabled():
        return start_span(name, parent=parent, attributes=attributes)
    if _custom_sampler:
        links = [Link(other.get_span_context()) for other in others]
        return start_span(name, parent=parent, links=links, attributes=attributes)
    span = start_span(name, parent=parent, attributes=attributes)
    if span.is_recording():
        try:
            for other in others:
                span.add_link(other.get_span_context())
        except Exception:
            log.exception("span links failed name=%s", name)
    return span


def inject(span: Span) -> list[tuple[str, bytes]]:
    """`traceparent`/`tracestate` headers naming `span` as the parent of the next hop."""
    try:
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return []
        out = [("traceparent", format_traceparent(ctx).encode())]
        state = format_tracestate(ctx)
        if state:
            out.append(("tracestate", state.encode()))
        return out
    except Exception:
        log.exception("trace inject failed")
        return []


def trace_id_hex(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format_trace_id(ctx.trace_id) if ctx.is_valid else None


def traceparent_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format_traceparent(ctx) if ctx.is_valid else None


def set_attributes(span: Span, attributes: Mapping[str, Any]) -> None:
    try:
        span.set_attributes(attributes)
    except Exception:
        log.exception("span attributes failed")


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
        return trace_id_hex(trace.get_current_span())
    except Exception:
        return None


def inject_current() -> dict[str, str]:
    """`traceparent`/`tracestate` of the current span, e.g. for an outgoing HTTP request."""
    return {key: value.decode() for key, value in inject(trace.get_current_span())}
