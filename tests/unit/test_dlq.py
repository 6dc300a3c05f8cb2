"""Dead-letter tooling without a broker: filters, times, redrive headers, tracing, pacing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.dlq.records import (
    DeadLetter,
    DeadLetterFilter,
    TimeSpecError,
    mark_rerun,
    parse_time,
    redrive_headers,
    to_ms,
)
from conveyor.dlq.redrive import Pacer, _prepare
from conveyor.dlq.replay import parse_position
from conveyor.dlq.scan import dlq_topics, parse_ref
from conveyor.settings import KafkaSettings

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TRACE_A = "0af7651916cd43dd8448eb211c80319c"
PARENT_A = f"00-{TRACE_A}-b7ad6b7169203331-01"


def letter(
    *,
    stage: str = "preprocess",
    error: str = "PermanentError",
    task: str = "t-1",
    at: datetime = NOW,
    offset: int = 0,
    extra: list[tuple[str, bytes]] | None = None,
    key: bytes | None = None,
    value: bytes = b"v",
) -> DeadLetter:
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_subject", task.encode()),
        ("conveyor_error_stage", stage.encode()),
        ("conveyor_error_class", error.encode()),
        ("conveyor_error_message", b"boom"),
        ("conveyor_original_topic", b"p.conveyor.task.submitted"),
        ("conveyor_original_partition", b"2"),
        ("conveyor_original_offset", b"41"),
    ]
    return DeadLetter(
        f"p.conveyor.{stage}.dlq",
        0,
        offset,
        to_ms(at),
        key if key is not None else task.encode(),
        value,
        headers + (extra or []),
    )


def test_filter_by_stage_error_class_and_task_id() -> None:
    a = letter(stage="preprocess", error="PermanentError", task="t-1")
    b = letter(stage="notify", error="DecodeError", task="t-2")
    assert DeadLetterFilter.build(stage="notify").matches(b)
    assert not DeadLetterFilter.build(stage="notify").matches(a)
    by_class = DeadLetterFilter.build(error_classes=["decodeerror", "SchemaError"])
    assert by_class.matches(b) and not by_class.matches(a)  # any of them, case-insensitive
    assert DeadLetterFilter.build(task_id="t-1").matches(a)
    assert not DeadLetterFilter.build(task_id="t-1").matches(b)
    assert DeadLetterFilter().matches(a) and DeadLetterFilter().matches(b)


def test_tenant_filter_tells_equal_task_ids_apart() -> None:
    acme = letter(task="t-1", extra=[("ce_tenant", b"acme")])
    globex = letter(task="t-1", extra=[("ce_tenant", b"globex")])
    plain = DeadLetter(
        "p.conveyor.preprocess.dlq", 0, 3, 0, None, b'{"task_id":"t-1","tenant":"acme"}', []
    )
    internal = DeadLetter(
        "p.conveyor.notify.dlq", 0, 4, 0, None, b'{"task":{"task_id":"t-1","tenant":"acme"}}', []
    )
    assert (acme.tenant, globex.tenant, plain.tenant, internal.tenant) == (
        "acme",
        "globex",
        "acme",
        "acme",
    )
    mine = DeadLetterFilter.build(task_id="t-1", tenant="acme")
    assert [mine.matches(x) for x in (acme, globex, plain, internal)] == [True, False, True, True]
    assert DeadLetterFilter.build(task_id="t-1").matches(globex)  # no tenant: every tenant's
    assert letter(task="t-1").tenant == ""


def test_task_id_matches_the_key_when_there_is_no_subject() -> None:
    raw = DeadLetter("p.conveyor.preprocess.dlq", 0, 3, 0, b"bad-plain", b"junk", [])
    assert raw.task_id == "bad-plain"
    assert raw.stage == "preprocess"  # from the topic when the header is missing
    assert DeadLetterFilter.build(task_id="bad-plain").matches(raw)


def test_time_window_is_since_inclusive_until_exclusive() -> None:
    early = letter(at=NOW - timedelta(hours=2))
    edge = letter(at=NOW - timedelta(hours=1))
    late = letter(at=NOW)
    window = DeadLetterFilter.build(since="1h", until=NOW.isoformat(), now=NOW)
    assert [window.matches(x) for x in (early, edge, late)] == [False, True, False]


def test_trace_id_filter_reads_header_ce_attribute_and_structured_body() -> None:
    in_header = letter(extra=[("traceparent", PARENT_A.encode())])
    in_ce = letter(extra=[("ce_traceparent", PARENT_A.encode())])
    body = json.dumps({"specversion": "1.0", "traceparent": PARENT_A}).encode()
    structured = DeadLetter(
        "p.conveyor.preprocess.dlq",
        0,
        0,
        0,
        b"k",
        body,
        [("content-type", b"application/cloudevents+json")],
    )
    other = letter(extra=[("traceparent", f"00-{'1' * 32}-{'2' * 16}-01".encode())])
    flt = DeadLetterFilter.build(trace_id=TRACE_A.upper())
    assert [flt.matches(x) for x in (in_header, in_ce, structured, other)] == [
        True,
        True,
        True,
        False,
    ]


def test_parse_time_accepts_rfc3339_naive_utc_and_relative() -> None:
    assert parse_time("2026-11-23T10:00:00Z", now=NOW) == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert parse_time("2026-11-23T11:00:00+01:00", now=NOW) == datetime(
        2026, 11, 23, 10, tzinfo=UTC
    )
    assert parse_time("2026-11-23 10:00:00.250", now=NOW).tzinfo == UTC
    assert parse_time("90s", now=NOW) == NOW - timedelta(seconds=90)
    assert parse_time("1.5h", now=NOW) == NOW - timedelta(minutes=90)
    assert parse_time("2d", now=NOW) == NOW - timedelta(days=2)
    with pytest.raises(TimeSpecError):
        parse_time("yesterday", now=NOW)


def test_millisecond_times_convert_exactly() -> None:
    ms = 1795404650811
    assert to_ms(parse_time("2026-11-23T03:30:50.811+00:00", now=NOW)) == ms
    assert to_ms(datetime.fromtimestamp(ms / 1000, UTC)) == ms


def test_parse_position_tells_offsets_from_times() -> None:
    assert parse_position("1200") == 1200
    assert parse_position("10m", now=NOW) == NOW - timedelta(minutes=10)


def test_redrive_headers_strip_error_origin_retry_and_old_trace_state() -> None:
    original = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_subject", b"t-1"),
        ("ce_type", b"conveyor.task.submitted.v1"),
        ("content-type", b"application/avro"),
        ("ce_tenant", b"acme"),
        ("ce_traceparent", PARENT_A.encode()),
        ("traceparent", PARENT_A.encode()),
        ("tracestate", b"k=v"),
        ("ce_attempt", b"4"),
        ("ce_firstfailedat", b"2026-11-23T00:00:00Z"),
        ("ce_lasterror", b"RetryableError: x"),
        ("conveyor_error_class", b"X"),
        ("conveyor_error_traceback", b"..."),
        ("conveyor_original_topic", b"in"),
        ("conveyor_original_offset", b"7"),
        ("conveyor_redriven_from", b"old:0:1"),
        ("x-custom", b"kept"),
    ]
    new = "00-" + "c" * 32 + "-" + "d" * 16 + "-01"
    out = redrive_headers(
        original,
        ref="p.conveyor.preprocess.dlq:1:9",
        trace=[("traceparent", new.encode())],
        linked=PARENT_A,
    )
    assert out == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_subject", b"t-1"),
        ("ce_type", b"conveyor.task.submitted.v1"),
        ("content-type", b"application/avro"),
        ("ce_tenant", b"acme"),
        ("x-custom", b"kept"),
        ("traceparent", new.encode()),
        ("ce_traceparent", new.encode()),
        ("conveyor_redriven_from", b"p.conveyor.preprocess.dlq:1:9"),
        ("conveyor_linked_traceparent", PARENT_A.encode()),
    ]


def test_redrive_headers_of_a_structured_record_add_no_ce_attributes() -> None:
    original = [
        ("content-type", b"application/cloudevents+json"),
        ("conveyor_error_class", b"DecodeError"),
    ]
    out = redrive_headers(original, ref="d:0:1", trace=[("traceparent", b"tp")], linked=None)
    assert out == [
        ("content-type", b"application/cloudevents+json"),
        ("traceparent", b"tp"),
        ("conveyor_redriven_from", b"d:0:1"),
    ]


def test_redriven_record_starts_a_new_trace_linked_to_the_original() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dl = letter(extra=[("traceparent", PARENT_A.encode()), ("ce_attempt", b"3")])
    record = _prepare(dl, provider.get_tracer("test"))
    (span,) = exporter.get_finished_spans()
    assert span.parent is None  # a root: the redrive is its own trace
    assert [format(link.context.trace_id, "032x") for link in span.links] == [TRACE_A]
    assert span.context.trace_id != int(TRACE_A, 16)
    headers = dict(record.headers)
    ctx = span.context
    started = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
    assert headers["traceparent"] == headers["ce_traceparent"] == started.encode()
    assert record.traceparent == started
    assert headers["conveyor_linked_traceparent"] == PARENT_A.encode()
    assert "ce_attempt" not in headers and record.topic == "p.conveyor.task.submitted"


def test_without_an_sdk_the_redrive_still_mints_a_new_trace_context() -> None:
    from opentelemetry.trace import NoOpTracer

    record = _prepare(letter(extra=[("traceparent", PARENT_A.encode())]), NoOpTracer())
    assert record.traceparent is not None
    assert record.traceparent.split("-")[1] != TRACE_A
    assert len(record.traceparent.split("-")[1]) == 32


def test_pacer_spaces_records_by_one_over_rate() -> None:
    clock = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    pacer = Pacer(4.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(5):
        pacer.wait()
    assert clock[0] == pytest.approx(101.0)  # (5 - 1) / 4 seconds after the first
    unlimited = Pacer(None, sleep=lambda s: pytest.fail("no rate, no sleep"))
    unlimited.wait()


def test_refs_name_a_dlq_record_by_stage_or_topic() -> None:
    settings = KafkaSettings(topic_prefix="p.")
    assert parse_ref("preprocess:2:15", settings) == ("p.conveyor.preprocess.dlq", 2, 15)
    assert parse_ref("p.conveyor.notify.dlq:0:3", settings) == ("p.conveyor.notify.dlq", 0, 3)
    with pytest.raises(ValueError):
        parse_ref("preprocess:x:1", settings)
    assert dlq_topics(settings, None)[0] == "p.conveyor.preprocess.dlq"
    with pytest.raises(ValueError):
        dlq_topics(settings, "nonsense")


def test_mark_rerun_sets_the_cloudevents_attribute_in_either_mode() -> None:
    binary = [("ce_specversion", b"1.0"), ("ce_rerun", b"old"), ("x", b"y")]
    headers, value = mark_rerun(binary, b"avro", "redrive d:0:1")
    assert headers == [("ce_specversion", b"1.0"), ("x", b"y"), ("ce_rerun", b"redrive d:0:1")]
    assert value == b"avro"
    structured = [("content-type", b"application/cloudevents+json")]
    doc = {"specversion": "1.0", "id": "1", "data": {"task_id": "t"}}
    headers, value = mark_rerun(structured, json.dumps(doc).encode(), "replay t:0:5")
    assert headers == structured and json.loads(value) == {**doc, "rerun": "replay t:0:5"}
    garbage = [("content-type", b"application/cloudevents+json")]
    assert mark_rerun(garbage, b"{not json", "redrive d:0:2") == (garbage, b"{not json")
    assert mark_rerun([], b"plain", "redrive d:0:3") == ([], b"plain")


def test_redriven_record_is_marked_as_an_operator_rerun() -> None:
    dl = letter()
    record = _prepare(dl, trace.get_tracer("test"))
    assert dict(record.headers)["ce_rerun"] == f"redrive {dl.ref}".encode()
    assert record.value == dl.value


def test_a_keyless_subjectless_dead_letter_is_found_by_the_task_id_in_its_data() -> None:
    structured = json.dumps({"specversion": "1.0", "data": {"task_id": "t-7"}}).encode()
    plain = json.dumps({"task_id": "t-8", "kind": "embed"}).encode()
    cases = [
        ([("content-type", b"application/cloudevents+json")], structured, "t-7"),
        ([], plain, "t-8"),
        ([("ce_specversion", b"1.0"), ("content-type", b"application/json")], plain, "t-8"),
        ([("content-type", b"application/avro")], b"\x00\x01", ""),
    ]
    for headers, value, task_id in cases:
        dl = DeadLetter("p.conveyor.preprocess.dlq", 0, 1, 0, None, value, headers)
        assert dl.task_id == task_id
        assert DeadLetterFilter(task_id="t-8").matches(dl) is (task_id == "t-8")
