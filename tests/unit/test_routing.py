"""Retry and dead-letter routing without a broker: attempts, rungs, headers, status events."""

from __future__ import annotations

import pytest
from opentelemetry.trace import INVALID_SPAN

from conveyor.errors import PermanentError, RetryableError
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import decode, header_map
from conveyor.events.model import Event, event_id
from conveyor.runtime.deadletter import Failure, dead_letter_headers, origin_headers
from conveyor.runtime.handler import Emit
from conveyor.runtime.ladder import LASTERROR_MAX, RetryPolicy, retry_headers, rung_of
from conveyor.runtime.routing import Item, OutRecord, Router
from conveyor.settings import StageSettings
from tests.eventdata import INFERRED_TOPIC, MODERATED, TRACEPARENT, inferred_record

SCHEMAS = default_schemas()
PREFIX = "p."
NOW = "2026-11-23T00:00:05.000Z"
STATUS = "p.conveyor.task.status"


def router(delays: list[float] | None = None, **extra: object) -> Router:
    settings = StageSettings(
        stage="moderation",
        topic_prefix=PREFIX,
        retry_delays=[1, 2] if delays is None else delays,
        **extra,
    )  # type: ignore[arg-type]
    return Router("moderation", settings, load_catalog(), SCHEMAS)


def item(
    task_id: str = "t-1",
    *,
    topic: str = PREFIX + INFERRED_TOPIC,
    offset: int = 7,
    extra: list[tuple[str, bytes]] | None = None,
    decoded: bool = True,
) -> Item:
    key, value, headers = inferred_record(task_id)
    headers = headers + (extra or [])
    hmap = header_map(headers)
    event = decode(headers, value, SCHEMAS) if decoded else None
    return Item(topic, 2, offset, key, value, headers, hmap, INVALID_SPAN, event)


def retried(previous: OutRecord, *, topic: str, offset: int = 0) -> Item:
    """The item a stage reads back from a rung: the retry record as it was produced."""
    hmap = header_map(previous.headers)
    event = decode(previous.headers, previous.value, SCHEMAS)
    return Item(
        topic, 0, offset, previous.key, previous.value, previous.headers, hmap, INVALID_SPAN, event
    )


def fail(exc: Exception) -> Failure:
    return Failure.of(exc, permanent=isinstance(exc, PermanentError))


def status_of(record: OutRecord) -> dict[str, object]:
    assert record.topic == STATUS
    data = decode(record.headers, record.value, SCHEMAS).data
    assert isinstance(data, dict)
    return data


def test_policy_climbs_one_rung_per_failure_then_dead_letters() -> None:
    policy = RetryPolicy((1.0, 10.0, 60.0))
    assert [policy.next_rung(a) for a in (1, 2, 3, 4, 9)] == [1, 2, 3, None, None]
    assert policy.next_rung(0) is None
    assert policy.due_ms(1, 1_000) == 2_000
    assert policy.due_ms(3, 1_000) == 61_000
    assert RetryPolicy(()).next_rung(1) is None  # no rungs: the first failure dead-letters


def test_rung_of_reads_the_topic_suffix_only() -> None:
    assert rung_of("p.conveyor.moderation.retry.2") == 2
    assert rung_of("conveyor.moderation.retry.12") == 12
    assert rung_of("p.conveyor.moderation.dlq") == 0
    assert rung_of("conveyor.retry.1.dlq") == 0


def test_first_failure_goes_to_rung_one_with_original_bytes_and_headers() -> None:
    src = item(extra=[("traceparent", TRACEPARENT.encode()), ("x-custom", b"kept")])
    out, rung = router().failure(src, fail(RetryableError("db down")), NOW)
    assert rung == 1
    retry, status = out
    assert retry.topic == "p.conveyor.moderation.retry.1"
    assert retry.key == src.key and retry.value == src.value  # bytes untouched
    assert retry.headers[: len(src.headers)] == src.headers  # every original header, in order
    h = dict(retry.headers)
    assert h["ce_attempt"] == b"1"
    assert h["ce_firstfailedat"] == NOW.encode()
    assert h["ce_lasterror"] == b"RetryableError: db down"
    assert h["conveyor_original_topic"] == src.topic.encode()
    assert h["conveyor_original_partition"] == b"2" and h["conveyor_original_offset"] == b"7"
    body = status_of(status)
    assert body["status"] == "retrying" and body["attempt"] == 1 and body["stage"] == "moderation"
    assert body["task_id"] == "t-1" and body["tenant"] == "acme" and body["kind"] == "generate"
    assert body["callback_url"] == "http://127.0.0.1:9/hook"
    assert body["reason"] == "RetryableError: db down"
    assert status.key == b"t-1"


def test_retry_of_a_retry_replaces_state_and_keeps_first_failure_and_origin() -> None:
    r = router()
    first, _ = r.failure(item(), fail(RetryableError("one")), NOW)
    again = retried(first[0], topic="p.conveyor.moderation.retry.1", offset=3)
    out, rung = r.failure(again, fail(TimeoutError("two\nlines")), "2026-11-23T00:00:09.000Z")
    assert rung == 2
    record = out[0]
    assert record.topic == "p.conveyor.moderation.retry.2"
    assert record.value == first[0].value
    names = [k for k, _ in record.headers]
    for state in ("ce_attempt", "ce_firstfailedat", "ce_lasterror", "conveyor_original_topic"):
        assert names.count(state) == 1  # replaced, never appended twice
    h = dict(record.headers)
    assert h["ce_attempt"] == b"2"
    assert h["ce_firstfailedat"] == NOW.encode()  # the first failure's time survives
    assert h["ce_lasterror"] == b"TimeoutError: two lines"  # one line
    assert h["conveyor_original_topic"] == (PREFIX + INFERRED_TOPIC).encode()
    assert h["conveyor_original_offset"] == b"7"  # still the stage input, not the rung
    assert status_of(out[1])["attempt"] == 2


def test_failure_on_the_last_rung_dead_letters_with_attempts_rungs_plus_one() -> None:
    r = router([1, 2])
    records, _ = r.failure(item(), fail(RetryableError("x")), NOW)
    for rung_topic in ("p.conveyor.moderation.retry.1", "p.conveyor.moderation.retry.2"):
        records, rung = r.failure(
            retried(records[0], topic=rung_topic, offset=5), fail(RetryableError("x")), NOW
        )
    assert rung == 0
    dead, status = records
    assert dead.topic == "p.conveyor.moderation.dlq"
    h = {k: v.decode() for k, v in dead.headers}
    assert h["conveyor_error_attempts"] == "3"
    assert h["ce_attempt"] == "2"  # the record as last consumed, untouched
    assert h["conveyor_error_stage"] == "moderation"
    assert h["conveyor_error_class"] == "RetryableError"
    assert h["conveyor_error_reason"] == "retryable_error"
    assert "RetryableError" in h["conveyor_error_traceback"]
    assert h["conveyor_original_topic"] == PREFIX + INFERRED_TOPIC
    body = status_of(status)
    assert body["status"] == "failed" and body["attempt"] == 3
    decoded = decode(status.headers, status.value, SCHEMAS)
    assert decoded.id == event_id(
        "t-1",
        "conveyor.task.status.v1",
        "moderation.failed.p.conveyor.moderation.retry.2.0.5",
        tenant="acme",
    )


def test_permanent_error_dead_letters_at_once_with_one_attempt() -> None:
    out, rung = router().failure(item(), fail(PermanentError("bad input")), NOW)
    assert rung == 0
    assert out[0].topic == "p.conveyor.moderation.dlq"
    assert dict(out[0].headers)["conveyor_error_attempts"] == b"1"
    assert status_of(out[1])["status"] == "failed"


def test_no_rungs_configured_dead_letters_the_first_retryable_failure() -> None:
    out, rung = router([]).failure(item(), fail(RetryableError("x")), NOW)
    assert rung == 0 and out[0].topic == "p.conveyor.moderation.dlq"


def test_retrying_status_ids_are_deterministic_per_rung_so_redelivery_deduplicates() -> None:
    r = router()
    a, _ = r.failure(item(offset=1), fail(RetryableError("x")), NOW)
    b, _ = r.failure(item(offset=1), fail(RetryableError("y")), "2026-11-23T00:01:00.000Z")
    ids = [decode(o[1].headers, o[1].value, SCHEMAS).id for o in (a, b)]
    assert (
        ids[0]
        == ids[1]
        == event_id("t-1", "conveyor.task.status.v1", "moderation.retry.1", tenant="acme")
    )


def test_undecodable_record_gets_status_from_key_and_carried_headers() -> None:
    src = item(decoded=False)
    out, rung = router().failure(src, fail(PermanentError("garbage")), NOW)
    assert rung == 0
    body = status_of(out[1])
    assert body["task_id"] == "t-1" and body["tenant"] == "acme"
    assert body["rejected_record"] is True  # only the key names the task: untrustworthy
    assert dict(out[1].headers)["ce_traceparent"] == TRACEPARENT.encode()


def test_decoded_record_failure_is_attributed_to_its_task_not_a_rejected_record() -> None:
    out, _ = router().failure(item(), fail(PermanentError("bad")), NOW)
    body = status_of(out[1])
    assert body["task_id"] == "t-1" and body["rejected_record"] is False


def test_identity_comes_from_the_task_id_in_the_data_not_key_or_subject() -> None:
    # A keyless, subject-less record (as a minimal upstream sends it): the data names the task.
    key, value, headers = inferred_record("t-9")
    headers = [(k, v) for k, v in headers if k != "ce_subject"]
    event = decode(headers, value, SCHEMAS)
    assert event.subject is None
    src = Item(
        PREFIX + INFERRED_TOPIC,
        0,
        1,
        None,
        value,
        headers,
        header_map(headers),
        INVALID_SPAN,
        event,
    )
    assert src.task_id == "t-9"
    data = {**event.data, "verdict": "allow", "scores": {}, "reasons": []}
    data.pop("input")
    data.pop("inference_ms")
    (out,) = router().outputs(src, [Emit(MODERATED, data)], NOW)
    back = decode(out.headers, out.value, SCHEMAS)
    assert (out.key, back.subject, back.id) == (
        b"t-9",
        "t-9",
        event_id("t-9", MODERATED, tenant="acme"),
    )
    failed, _ = router().failure(src, fail(PermanentError("bad")), NOW)
    assert failed[1].key == b"t-9" and status_of(failed[1])["task_id"] == "t-9"


def test_rerun_extension_travels_to_outputs_and_status_events() -> None:
    rerun = "redrive p.conveyor.moderation.dlq:0:3"
    src = item(extra=[("ce_rerun", rerun.encode())])
    assert src.event is not None
    data = {**src.event.data, "verdict": "allow", "scores": {}, "reasons": []}
    data.pop("input")
    data.pop("inference_ms")
    (out,) = router().outputs(src, [Emit(MODERATED, data)], NOW)
    back = decode(out.headers, out.value, SCHEMAS)
    assert back.ext("rerun") == rerun
    # A re-run is a new run: its ids differ from the first run's, and repeat on redelivery.
    assert back.id != event_id("t-1", MODERATED, tenant="acme")
    (again,) = router().outputs(src, [Emit(MODERATED, data)], NOW)
    assert decode(again.headers, again.value, SCHEMAS).id == back.id
    failed, _ = router().failure(src, fail(PermanentError("bad")), NOW)
    assert decode(failed[1].headers, failed[1].value, SCHEMAS).ext("rerun") == rerun


def test_an_upstream_cannot_claim_an_operator_rerun_on_the_ingress_topic() -> None:
    ingress = PREFIX + "conveyor.task.submitted"
    marked = [("ce_rerun", b"redrive forged:0:1")]
    rung = ("p.conveyor.preprocess.retry.1", [("conveyor_original_topic", ingress.encode())])
    cases = [
        (ingress, marked, False),
        (rung[0], marked + rung[1], False),  # a forged mark that climbed the retry ladder
        (ingress, marked + [("conveyor_redriven_from", b"d:0:1")], True),
        (rung[0], marked + rung[1] + [("conveyor_replayed_from", b"t:0:1")], True),
    ]
    for topic, extra, kept in cases:
        src = item(topic=topic, extra=extra)
        assert src.event is not None
        failed, _ = router().failure(src, fail(PermanentError("bad")), NOW)
        back = decode(failed[1].headers, failed[1].value, SCHEMAS)
        assert (back.ext("rerun") is not None) is kept


def test_record_without_key_or_subject_is_dead_lettered_without_status() -> None:
    src = item(decoded=False)
    src.key = None
    out, rung = router().failure(src, fail(PermanentError("garbage")), NOW)
    assert rung == 0 and [o.topic for o in out] == ["p.conveyor.moderation.dlq"]


def test_outputs_drop_retry_state_and_use_deterministic_ids() -> None:
    r = router()
    first, _ = r.failure(item(), fail(RetryableError("x")), NOW)
    src = retried(first[0], topic="p.conveyor.moderation.retry.1")
    assert src.event is not None and src.event.attempt == 1
    data = {**src.event.data, "verdict": "allow", "scores": {}, "reasons": []}
    data.pop("input")
    data.pop("inference_ms")
    (out,) = r.outputs(src, [Emit(MODERATED, data)], NOW)
    assert out.topic == "p.conveyor.task.moderated" and out.key == b"t-1"
    event: Event = decode(out.headers, out.value, SCHEMAS)
    assert event.id == event_id("t-1", MODERATED, tenant="acme")
    assert event.source == "/conveyor/moderation" and event.subject == "t-1"
    assert not {"attempt", "firstfailedat", "lasterror"} & set(event.extensions)
    assert event.ext("tenant") == "acme" and event.ext("traceparent") == TRACEPARENT


def test_unknown_or_oversize_output_is_a_permanent_error() -> None:
    src = item()
    with pytest.raises(PermanentError, match="unknown event type"):
        router().outputs(src, [Emit("conveyor.task.nope.v1", {})], NOW)
    assert src.event is not None
    data = {**src.event.data, "verdict": "allow", "text": "x" * 5000}
    with pytest.raises(PermanentError, match="over the 2048-byte limit"):
        router(max_record_bytes=2048).outputs(src, [Emit(MODERATED, data)], NOW)


def test_retry_headers_truncate_lasterror_and_keep_other_headers() -> None:
    out = retry_headers(
        [("a", b"1"), ("ce_attempt", b"4"), ("b", b"2")],
        attempt=5,
        first_failed_at=NOW,
        error="e" * 1000,
    )
    assert out[:2] == [("a", b"1"), ("b", b"2")]
    assert dict(out)["ce_attempt"] == b"5"
    assert len(dict(out)["ce_lasterror"]) == LASTERROR_MAX


def test_dead_letter_headers_replace_earlier_error_headers() -> None:
    first = dead_letter_headers(
        [("k", b"v")], fail(PermanentError("one")), stage="s", attempts=1, now=NOW
    )
    second = dead_letter_headers(first, fail(PermanentError("two")), stage="s", attempts=2, now=NOW)
    names = [k for k, _ in second]
    assert names.count("conveyor_error_message") == 1
    assert dict(second)["conveyor_error_message"] == b"two" and second[0] == ("k", b"v")
    assert origin_headers(second, "t", 0, 1) == second + [
        ("conveyor_original_topic", b"t"),
        ("conveyor_original_partition", b"0"),
        ("conveyor_original_offset", b"1"),
    ]
