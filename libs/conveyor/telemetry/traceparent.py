"""W3C trace-context headers, read and written without the propagator's machinery.

`TraceContextTextMapPropagator` goes through a carrier, a getter, a regular expression search and
a new `Context` for each header it reads (~5 µs), and `inject` through the current context and a
setter. A stage reads and writes one `traceparent` per record, so this module does the same
parsing directly: it accepts exactly what the propagator accepts and writes what it writes.
"""

from __future__ import annotations

import re

from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.span import TraceState

# version-traceid-parentid-flags, lower-case hex only (as the propagator's expression).
_FIELDS = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_LENGTH = 55  # of the four fields; a later version may append more after a "-"
_MAX_TRACEPARENT = 512  # longer headers are ignored, as the propagator ignores them
_MAX_TRACESTATE = 512  # W3C: a vendor list over 512 characters may be discarded
_FLAGS = [TraceFlags(n) for n in range(256)]


def parse(traceparent: str, tracestate: str | None = None) -> SpanContext | None:
    """The remote span context a `traceparent` (and `tracestate`) names, or None if invalid.

    Version `ff` and all-zero trace or parent ids are invalid; version `00` has exactly four
    fields; spaces and tabs around the value are allowed, as the propagator allows them.
    """
    fields = _valid_fields(traceparent)
    if fields is None:
        return None
    state = None
    if tracestate and len(tracestate) <= _MAX_TRACESTATE:
        state = TraceState.from_header([tracestate])
    return SpanContext(
        int(fields[3:35], 16), int(fields[36:52], 16), True, _FLAGS[int(fields[53:], 16)], state
    )


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 lower-case hex digits) of a `traceparent` that `parse` accepts, else
    None: the one reading of a header's trace id for logs, the store and `dlq` filters, so a
    header the propagator would reject names no trace anywhere."""
    fields = _valid_fields(traceparent) if traceparent else None
    return fields[3:35] if fields is not None else None


def is_unsampled(traceparent: str) -> bool:
    """Whether `traceparent` is a valid version-00 header whose sampled flag is off: what
    `parse` would accept as an unsampled context, checked without building it."""
    return (
        len(traceparent) == _LENGTH
        and traceparent[54] in "02468ace"  # the flags' low bit: sampled
        and _valid_fields(traceparent) is not None
    )


_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def _valid_fields(traceparent: str) -> str | None:
    """The four fields of a valid `traceparent` (the rules in `parse`), else None."""
    fields = traceparent if len(traceparent) == _LENGTH else _four_fields(traceparent)
    if (
        fields is None
        or _FIELDS.fullmatch(fields) is None
        or fields.startswith("ff")
        or fields[3:35] == _ZERO_TRACE
        or fields[36:52] == _ZERO_SPAN
    ):
        return None
    return fields


def _four_fields(value: str) -> str | None:
    if len(value) > _MAX_TRACEPARENT:
        return None
    text = value.lstrip(" \t")
    head, rest = text[:_LENGTH], text[_LENGTH:]
    if rest.startswith("-"):
        return None if head.startswith("00") else head
    return None if rest.strip(" \t") else head


def format_traceparent(ctx: SpanContext) -> str:
    """The `traceparent` naming `ctx` (version 00), as the propagator's `inject` writes it."""
    # printf-style: a third faster than format specifications, once per output record
    return "00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)  # noqa: UP031


def format_trace_id(trace_id: int) -> str:
    """A trace id as a `traceparent` writes it: 32 lower-case hex digits."""
    return "%032x" % trace_id  # noqa: UP031 (printf-style, as format_traceparent)


def format_tracestate(ctx: SpanContext) -> str | None:
    """The `tracestate` to send with `ctx`'s traceparent, or None when it has none."""
    return ctx.trace_state.to_header() if ctx.trace_state else None
