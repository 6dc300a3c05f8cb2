"""One trace per task through all five services as processes, retries and dead letters included.

The run (tests/e2e/observability.py) exports every service's spans over OTLP/HTTP to a receiver
in this process; these tests read the spans the way a trace backend would show them.
"""

from __future__ import annotations

import pytest

from conveyor.cli.main import main as conveyor
from conveyor.local.otlp import STATUS_ERROR, ReceivedSpan
from tests.e2e.observability import ObservedRun, shared_run

pytestmark = [pytest.mark.broker, pytest.mark.models]
STAGES = ("preprocess", "inference", "moderation", "writeback", "notify")
CLIENT, PRODUCER, CONSUMER = 3, 4, 5  # OTLP SpanKind


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> ObservedRun:
    return shared_run(kafka_bootstrap, tmp_path_factory)


def task_spans(run: ObservedRun, task_id: str) -> list[ReceivedSpan]:
    return [s for s in run.spans if s.attributes.get("conveyor.task_id") == task_id]


def chain_up(spans: list[ReceivedSpan], leaf: ReceivedSpan) -> list[ReceivedSpan]:
    """`leaf` and its ancestors, root last; stops at a parent that was never received."""
    by_id = {s.span_id: s for s in spans}
    out = [leaf]
    while out[-1].parent_span_id is not None and out[-1].parent_span_id in by_id:
        out.append(by_id[out[-1].parent_span_id])
    return out


def notify_spans(run: ObservedRun, task_id: str) -> list[ReceivedSpan]:
    """The notify consume spans that succeeded (read from the stage's input or a retry rung)."""
    spans = [
        s
        for s in task_spans(run, task_id)
        if s.service == "conveyor-notify" and s.kind == CONSUMER and s.status_code != STATUS_ERROR
    ]
    assert spans, f"no successful notify span for {task_id}"
    return spans


def test_each_task_is_one_trace_with_one_parent_chain_in_stage_order(run: ObservedRun) -> None:
    for task_id, status in run.expect.items():
        if status != "completed":
            continue
        spans = task_spans(run, task_id)
        trace_ids = {s.trace_id for s in spans}
        assert len(trace_ids) == 1, (task_id, trace_ids)
        trace_id = trace_ids.pop()
        in_trace = [s for s in run.spans if s.trace_id == trace_id]
        services = {s.service for s in in_trace}
        assert {f"conveyor-{stage}" for stage in STAGES} <= services, (task_id, services)
        for leaf in notify_spans(run, task_id):
            chain = chain_up(in_trace, leaf)
            hops = [s.service.removeprefix("conveyor-") for s in chain if s.kind == CONSUMER]
            assert hops == list(reversed(STAGES)), (task_id, [(s.service, s.name) for s in chain])
            assert chain[-1].parent_span_id is None, "the chain must reach the trace's root"
            if task_id == run.unsampled_task:
                # Published without trace context: preprocess's span is the new root.
                assert chain[-1].service == "conveyor-preprocess"
            else:
                assert chain[-1].service == "conveyor-submit"
                assert chain[-1].name.startswith("submit")
        if task_id != run.unsampled_task:
            assert run.submitted_traces[task_id] == trace_id
        record = run.records[task_id]
        assert record is not None and record.trace_id == trace_id


def test_retried_notification_is_in_the_same_trace_as_the_first_attempt(
    run: ObservedRun,
) -> None:
    notify = [
        s
        for s in task_spans(run, run.retried_task)
        if s.service == "conveyor-notify" and s.kind == CONSUMER
    ]
    assert len(notify) == 2, notify
    failed = [s for s in notify if s.status_code == STATUS_ERROR]
    retried = [
        s
        for s in notify
        if s.attributes["messaging.destination.name"] == run.topic("conveyor.notify.retry.1")
    ]
    assert len(failed) == 1 and len(retried) == 1 and failed != retried
    assert failed[0].attributes["messaging.destination.name"] == run.topic("conveyor.task.stored")
    # The failed attempt's span says where the record went.
    assert failed[0].attributes["conveyor.outcome"] == "retry.1"
    assert failed[0].attributes["conveyor.retry.rung"] == 1
    assert failed[0].attributes["conveyor.failure.destination"] == run.topic(
        "conveyor.notify.retry.1"
    )
    assert len({s.trace_id for s in task_spans(run, run.retried_task)}) == 1
    # Both attempts are children of the PRODUCER span of the stored event writeback emitted.
    assert failed[0].parent_span_id == retried[0].parent_span_id
    parent = next(s for s in run.spans if s.span_id == failed[0].parent_span_id)
    assert parent.service == "conveyor-writeback" and parent.kind == PRODUCER
    assert parent.name == "create " + run.topic("conveyor.task.stored")


def test_dead_lettered_task_status_and_notification_stay_in_its_trace(run: ObservedRun) -> None:
    spans = task_spans(run, run.dead_task)
    assert len({s.trace_id for s in spans}) == 1
    rejected = [s for s in spans if s.service == "conveyor-preprocess" and s.kind == CONSUMER]
    assert len(rejected) == 1 and rejected[0].status_code == STATUS_ERROR
    assert rejected[0].attributes["conveyor.outcome"] == "dead-lettered"
    assert rejected[0].attributes["conveyor.failure.destination"] == run.topic(
        "conveyor.preprocess.dlq"
    )
    assert {"conveyor-submit", "conveyor-preprocess", "conveyor-writeback", "conveyor-notify"} <= {
        s.service for s in spans
    }
    for leaf in notify_spans(run, run.dead_task):
        chain = chain_up(run.spans, leaf)
        assert [s.service for s in chain if s.kind == CONSUMER] == [
            "conveyor-notify",
            "conveyor-writeback",
            "conveyor-preprocess",
        ]


def test_every_stage_span_has_messaging_attributes(run: ObservedRun) -> None:
    stage_spans = [s for s in run.spans if s.kind == CONSUMER or s.name.endswith(" batch")]
    assert {s.service for s in stage_spans} == {f"conveyor-{stage}" for stage in STAGES}
    for span in stage_spans:
        attrs = span.attributes
        assert attrs["messaging.system"] == "kafka", span
        assert attrs["messaging.operation.type"] == "process", span
        assert attrs["messaging.consumer.group.name"].startswith(run.prefix), span
        if span.kind == CONSUMER:
            assert attrs["messaging.destination.name"].startswith(run.prefix), span
            assert attrs["messaging.client.id"].startswith(span.service + "-"), span
            assert attrs["server.address"] == "127.0.0.1", span
            assert attrs["messaging.kafka.message.key"], span
            assert isinstance(attrs["messaging.kafka.offset"], int), span
            assert attrs["messaging.destination.partition.id"].isdigit(), span
            assert attrs["cloudevents.event_type"].startswith("conveyor.task."), span
    submits = [s for s in run.spans if s.service == "conveyor-submit"]
    assert submits and all(s.attributes["messaging.operation.type"] == "send" for s in submits)
    assert all(s.attributes["messaging.operation.name"] == "send" for s in submits)


def test_every_consume_span_is_a_child_of_a_producer_span_and_no_parent_is_missing(
    run: ObservedRun,
) -> None:
    by_id = {s.span_id: s for s in run.spans}
    for span in run.spans:
        if span.parent_span_id is not None:
            assert span.parent_span_id in by_id, ("parent never exported", span)
        if span.kind != CONSUMER or span.parent_span_id is None:
            continue  # a root consume span: the task published without trace context
        parent = by_id[span.parent_span_id]
        assert parent.kind == PRODUCER, (span.service, span.name, parent.name)
        if parent.service != "conveyor-submit":
            # A stage's producer span ends before the record is sent, inside its consume span.
            grand = by_id[parent.parent_span_id or ""]
            assert grand.kind == CONSUMER and grand.service == parent.service, grand
            assert span.start_ns >= parent.end_ns, "a consumer starts after its producer"


def test_every_span_names_its_host_and_service_instance(run: ObservedRun) -> None:
    for span in run.spans:
        assert span.resource["host.name"] and span.resource["host.arch"], span
        assert span.resource["service.instance.id"], span
    instances = {s.service: s.resource["service.instance.id"] for s in run.spans}
    assert len(set(instances.values())) == len(instances), instances


@pytest.mark.parametrize(
    ("service", "name"),
    [
        ("preprocess", "tokenise"),
        ("inference", "embed"),
        ("inference", "classify"),
        ("moderation", "classify profanity"),
        ("writeback", "db upsert"),
        ("notify", "webhook POST"),
    ],
)
def test_handler_spans_nest_inside_their_stage_span(
    run: ObservedRun, service: str, name: str
) -> None:
    by_id = {s.span_id: s for s in run.spans}
    handler = [s for s in run.spans if s.service == f"conveyor-{service}" and s.name == name]
    assert handler, f"no {name!r} span from {service}"
    for span in handler:
        parent = by_id.get(span.parent_span_id or "")
        assert parent is not None and parent.service == span.service, span
        assert parent.kind == CONSUMER or parent.name == f"{service} batch", parent


def test_log_lines_carry_trace_id_and_task_id(run: ObservedRun) -> None:
    for task_id in run.expect:
        trace_id = run.records[task_id].trace_id  # type: ignore[union-attr]
        for stage in ("preprocess", "notify"):
            line = f"stage={stage} task_id={task_id} trace_id={trace_id}"
            assert line in run.logs[stage], (stage, task_id)


def test_conveyor_trace_prints_the_stored_trace_and_jaeger_link(
    run: ObservedRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVEYOR_STORE_URL", run.store_url)
    monkeypatch.setenv("CONVEYOR_JAEGER_URL", "http://jaeger.test:16686")
    task_id = next(iter(run.submitted_traces))
    assert conveyor(["trace", task_id]) == 0
    trace_id = run.submitted_traces[task_id]
    assert f"http://jaeger.test:16686/trace/{trace_id}" in capsys.readouterr().out


def test_webhook_spans_are_client_spans_of_their_own_task_naming_the_server(
    run: ObservedRun,
) -> None:
    by_id = {s.span_id: s for s in run.spans}
    hooks = [s for s in run.spans if s.service == "conveyor-notify" and s.name == "webhook POST"]
    assert len({s.attributes["conveyor.task_id"] for s in hooks}) >= len(run.expect) - 1
    for span in hooks:
        assert span.kind == CLIENT, span
        assert span.attributes["server.address"] == "127.0.0.1", span
        assert isinstance(span.attributes["server.port"], int), span
        assert span.attributes["url.full"].endswith("/hooks"), span  # no userinfo or query
        # Child of its own record's consume span, though notify sends a batch's webhooks at once.
        parent = by_id[span.parent_span_id or ""]
        assert parent.kind == CONSUMER, parent
        assert parent.attributes["conveyor.task_id"] == span.attributes["conveyor.task_id"]
