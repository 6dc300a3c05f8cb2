"""What a dead letter says, which ones an operator asked for, and the headers of a redrive.

Pure functions of their inputs (no Kafka client), so every filter and header rule has a unit
test. A `DeadLetter` is one record of a `conveyor.<stage>.dlq` topic: the original bytes and
headers plus the `conveyor_error_*` / `conveyor_original_*` headers the runtime added
(`conveyor.runtime.deadletter`). Its time is the DLQ record's Kafka timestamp, i.e. when the
stage dead-lettered it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.events.model import ATTEMPT, FIRSTFAILEDAT, LASTERROR, RERUN, STRUCTURED
from conveyor.runtime.deadletter import (
    ERROR_PREFIX,
    ORIGINAL_OFFSET,
    ORIGINAL_PARTITION,
    REDRIVEN_FROM,
)
from conveyor.runtime.deadletter import ORIGINAL_TOPIC as ORIGINAL_TOPIC_HEADER
from conveyor.telemetry.traceparent import trace_id_of

Headers = list[tuple[str, bytes]]
# The trace context of the record before the redrive (the redrive span links to it).
LINKED_TRACEPARENT = "conveyor_linked_traceparent"
ORIGINAL_PREFIX = "conveyor_original_"
RETRY_STATE_HEADERS = frozenset("ce_" + name for name in (ATTEMPT, FIRSTFAILEDAT, LASTERROR))
TRACE_HEADERS = frozenset(("traceparent", "tracestate", "ce_traceparent", "ce_tracestate"))
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TimeSpecError(ValueError):
    """A --since/--until/--from/--to value that is neither RFC 3339 nor relative (`1h`)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered record, as read from its DLQ topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: Headers = field(default_factory=list)

    @classmethod
    def of(cls, msg: Any) -> DeadLetter:
        """From a confluent-kafka Message."""
        return cls(
            msg.topic(),
            msg.partition(),
            msg.offset(),
            msg.timestamp()[1],
            msg.key(),
            msg.value() or b"",
            list(msg.headers() or ()),
        )

    @property
    def ref(self) -> str:
        """`<dlq topic>:<partition>:<offset>`: names the record in redrive headers and `show`."""
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def hmap(self) -> dict[str, str]:
        # Lenient: a record dead-lettered for undecodable headers must still be listable.
        return {k: (v or b"").decode("utf-8", "replace") for k, v in self.headers}

    @property
    def stage(self) -> str:
        return self.hmap.get(ERROR_PREFIX + "stage") or stage_of_dlq(self.topic)

    @property
    def error_class(self) -> str:
        return self.hmap.get(ERROR_PREFIX + "class", "")

    @property
    def message(self) -> str:
        return self.hmap.get(ERROR_PREFIX + "message", "")

    @property
    def task_id(self) -> str:
        """Its subject, else its key, else the `task_id` of JSON task data (a keyless,
        subject-less ingress record is still found by the id its task names)."""
        subject = self.hmap.get("ce_subject")
        if subject:
            return subject
        if self.key:
            return self.key.decode("utf-8", "replace")
        return _json_task_id(
            self.value, structured=self.hmap.get("content-type", "").startswith(STRUCTURED)
        )

    @property
    def tenant(self) -> str:
        """Its `ce_tenant` header, else the `tenant` of JSON task data; "" if it names none.
        A task is (tenant, task id): with `--task-id`, this tells equal ids apart."""
        tenant = self.hmap.get("ce_tenant")
        if tenant:
            return tenant
        return _json_field(
            self.value,
            "tenant",
            structured=self.hmap.get("content-type", "").startswith(STRUCTURED),
        )

    @property
    def original_topic(self) -> str:
        return self.hmap.get(ORIGINAL_TOPIC_HEADER, "")

    @property
    def original(self) -> str:
        h = self.hmap
        return (
            f"{h.get(ORIGINAL_TOPIC_HEADER, '?')}:{h.get(ORIGINAL_PARTITION, '?')}:"
            f"{h.get(ORIGINAL_OFFSET, '?')}"
        )

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)

    def traceparents(self) -> list[str]:
        """The record's trace contexts: headers first, else a structured event's attribute."""
        h = self.hmap
        found = [h[k] for k in ("traceparent", "ce_traceparent") if h.get(k)]
        if not found and h.get("content-type", "").startswith(STRUCTURED):
            try:
                doc = json.loads(self.value)
            except (ValueError, UnicodeDecodeError):
                return []
            if isinstance(doc, dict) and isinstance(doc.get("traceparent"), str):
                found.append(doc["traceparent"])
        return found

    def trace_ids(self) -> set[str]:
        return {t for t in (trace_id_of(p) for p in self.traceparents()) if t}


def _json_task_id(value: bytes, *, structured: bool) -> str:
    return _json_field(value, "task_id", structured=structured)


def _json_field(value: bytes, name: str, *, structured: bool) -> str:
    """A string field of JSON task data (flat ingress, or internal `task`), else ""."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ""  # Avro, or not a task at all
    data = doc.get("data") if structured and isinstance(doc, dict) else doc
    if isinstance(data, dict) and isinstance(data.get("task"), dict):
        data = data["task"]
    found = data.get(name) if isinstance(data, dict) else None
    return found if isinstance(found, str) else ""


def stage_of_dlq(topic: str) -> str:
    """`<prefix>conveyor.<stage>.dlq` -> `<stage>`."""
    name = topic.removesuffix(".dlq")
    return name.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operator asked for; every given criterion must match."""

    stage: str | None = None
    error_classes: frozenset[str] = frozenset()
    since_ms: int | None = None  # inclusive
    until_ms: int | None = None  # exclusive
    task_id: str | None = None
    trace_id: str | None = None
    tenant: str | None = None

    def matches(self, dl: DeadLetter) -> bool:
        if self.stage and dl.stage != self.stage:
            return False
        if self.error_classes and dl.error_class.lower() not in self.error_classes:
            return False
        if self.since_ms is not None and dl.timestamp_ms < self.since_ms:
            return False
        if self.until_ms is not None and dl.timestamp_ms >= self.until_ms:
            return False
        if self.task_id and self.task_id not in (dl.task_id, _text(dl.key)):
            return False
        if self.tenant is not None and dl.tenant != self.tenant:
            return False
        return not self.trace_id or self.trace_id.lower() in dl.trace_ids()

    @classmethod
    def build(
        cls,
        *,
        stage: str | None = None,
        error_classes: Iterable[str] = (),
        since: str | None = None,
        until: str | None = None,
        task_id: str | None = None,
        trace_id: str | None = None,
        tenant: str | None = None,
        now: datetime | None = None,
    ) -> DeadLetterFilter:
        """From command-line values; times are RFC 3339 or relative to `now` (`90s`, `1h`)."""
        now = now or datetime.now(UTC)
        return cls(
            stage=stage,
            error_classes=frozenset(c.lower() for c in error_classes),
            since_ms=to_ms(parse_time(since, now=now)) if since else None,
            until_ms=to_ms(parse_time(until, now=now)) if until else None,
            task_id=task_id,
            trace_id=trace_id,
            tenant=tenant,
        )


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def parse_time(text: str, *, now: datetime) -> datetime:
    """RFC 3339 (`2026-11-23T10:00:00Z`, naive = UTC) or relative to now (`30s`, `15m`, `1h`,
    `2d`, `1w`: that long ago)."""
    value = text.strip()
    match = _RELATIVE.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise TimeSpecError(f"{text!r} is neither RFC 3339 nor a relative time like 1h") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def to_ms(moment: datetime) -> int:
    # Integer arithmetic: `timestamp() * 1000` is a float and can land 1 ms early.
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def redrive_headers(
    headers: Sequence[tuple[str, bytes | None]], *, ref: str, trace: Headers, linked: str | None
) -> Headers:
    """The original CloudEvent headers for a fresh start, naming where the record came from.

    Dropped: `conveyor_error_*` and `conveyor_original_*` (the stage adds new ones if it fails
    again), the retry state (a fresh retry budget), the old trace context and any earlier
    redrive headers. Added: `trace` (the redrive span's `traceparent`/`tracestate`, and the
    CloudEvents `ce_traceparent`/`ce_tracestate` when the record is in binary mode, so the
    task's stored trace id is the new trace), `conveyor_redriven_from` and
    `conveyor_linked_traceparent` (the context the redrive span links to).
    """
    binary = any(k == "ce_specversion" for k, _ in headers)
    kept: Headers = [(k, v or b"") for k, v in headers if not _dropped(k)]
    kept += trace
    if binary:
        kept += [("ce_" + k, v) for k, v in trace]
    kept.append((REDRIVEN_FROM, ref.encode()))
    if linked:
        kept.append((LINKED_TRACEPARENT, linked.encode()))
    return kept


def _dropped(key: str) -> bool:
    return (
        key.startswith(ERROR_PREFIX)
        or key.startswith(ORIGINAL_PREFIX)
        or key in RETRY_STATE_HEADERS
        or key in TRACE_HEADERS
        or key in (REDRIVEN_FROM, LINKED_TRACEPARENT)
    )


def mark_rerun(
    headers: Sequence[tuple[str, bytes | None]], value: bytes, action: str
) -> tuple[Headers, bytes]:
    """Mark a record an operator sends back as a re-run of its task (`action`, e.g.
    `redrive <ref>`): the CloudEvents `rerun` attribute, a `ce_rerun` header in binary mode or a
    member of the JSON body in structured mode, replacing an earlier one. Its outputs then carry
    it to writeback, where it alone may replace the task's terminal status (with a newer event).
    A record that is neither is returned as it is: it cannot decode, so it claims nothing."""
    kept: Headers = [(k, v or b"") for k, v in headers if k != "ce_" + RERUN]
    if any(k == "ce_specversion" for k, _ in kept):
        return kept + [("ce_" + RERUN, action.encode())], value
    content_type = next((v for k, v in kept if k == "content-type"), b"").decode("utf-8", "replace")
    if not content_type.startswith(STRUCTURED):
        return kept, value
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return kept, value
    if not isinstance(doc, dict):
        return kept, value
    doc[RERUN] = action
    return kept, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
