"""The span model without a broker: producer spans between hops, consume span attributes, where a
failed record went, the resource, the submit side's sampling and preprocess's end-to-end latency.

Spans are recorded by an in-memory SDK provider patched into `tracing.tracer` for one test (as in
test_tracing.py), so the process-wide tracer provider stays untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conveyor.errors import PermanentError, RetryableError
from conveyor.events.catalog import INGRESS_TYPE
from conveyor.events.codec import header_map
from conveyor.events.model import Event
from conveyor.runtime.deadletter import Failure
from conveyor.runtime.handler import Emit
from conveyor.runtime.routing import Item
from conveyor.runtime.step import RecordOutcome
from conveyor.runtime.telemetry import StageTelemetry
from conveyor.telemetry import tracing
from conveyor.telemetry.metrics import E2E_LATENCY, StageMetrics
from tests.eventdata import MODERATED
from tests.unit.test_routing import NOW, item, router

HOP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def consumed(task_id: str = "t-1") -> Item:
    """A decoded record with a recording CONSUMER span, child of `HOP`."""
    record = item(task_id)
    record.span = tracing.record_span(
        f"process {record.topic}",
        parent=tracing.remote_span(HOP),
        attributes=lambda: {"conveyor.task_id": task_id},
    )
    return record


def moderated(record: Item, n: int = 0) -> Emit:
    assert record.event is not None
    data = {**record.event.data, "verdict": "allow", "scores": {}, "reasons": []}
    data.pop("input")
    data.pop("inference_ms")
    return Emit(MODERATED, data, discriminator=str(n))


def spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_each_emitted_record_names_its_own_producer_span_child_of_the_consume_span(
    exported: InMemorySpanExporter,
) -> None:
    record = consumed()
    out = router().outputs(record, [moderated(record, 1), moderated(record, 2)], NOW)
    tracing.end_span(record.span)
    producers = [s for s in exported.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert len(producers) == 2
    process = spans(exported)[f"process {record.topic}"]
    for record_out, producer in zip(out, producers, strict=True):
        assert producer.name == f"create {record_out.topic}"
        assert producer.parent is not None
        assert producer.parent.span_id == process.context.span_id
        attrs = dict(producer.attributes or {})
        assert attrs["messaging.operation.type"] == "create"
        assert attrs["messaging.destination.name"] == record_out.topic
        assert attrs["messaging.system"] == "kafka"
        # The next hop's parent is this record's producer span, not the consume span.
        parent = tracing.remote_parent(header_map(record_out.headers))
        assert parent is not None
        assert parent.get_span_context().span_id == producer.context.span_id
        # The producer span ended before the record was handed over: no child outlives a
        # parent that "contains" it.
        assert producer.end_time is not None and producer.end_time <= process.end_time  # type: ignore[operator]


def test_an_unsampled_record_gets_no_producer_span_and_hands_on_its_context(
    exported: InMemorySpanExporter,
) -> None:
    unsampled = HOP[:-2] + "00"
    record = item("t-2", extra=[("traceparent", unsampled.encode())])
    record.span = tracing.DeferredRemoteSpan(unsampled, None)
    (out,) = router().outputs(record, [moderated(record)], NOW)
    assert header_map(out.headers)["traceparent"] == unsampled
    assert exported.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("error", "outcome", "destination"),
    [
        (RetryableError("flaky"), "retry.1", "p.conveyor.moderation.retry.1"),
        (PermanentError("bad"), "dead-lettered", "p.conveyor.moderation.dlq"),
    ],
)
def test_a_failed_record_span_says_where_it_went(
    exported: InMemorySpanExporter, error: Exception, outcome: str, destination: str
) -> None:
    record = consumed()
    failure = Failure.of(error, permanent=isinstance(error, PermanentError))
    records, rung = router().failure(record, failure, NOW)
    telemetry = StageTelemetry("moderation", "g", StageMetrics("moderation"))
    telemetry.record_finish(RecordOutcome(record, records, failure, rung), error)
    attrs = dict(spans(exported)[f"process {record.topic}"].attributes or {})
    assert attrs["conveyor.outcome"] == outcome
    assert attrs["conveyor.failure.destination"] == destination
    assert attrs["error.type"] == type(error).__name__
    assert attrs.get("conveyor.retry.rung") == (1 if rung else None)


def test_consume_span_names_client_broker_and_message_key(
    exported: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "_enabled", True)
    record = item("t-3")

    class Msg:
        def topic(self) -> str:
            return record.topic

        def partition(self) -> int:
            return 2

        def offset(self) -> int:
            return 7

        def key(self) -> bytes:
            return b"t-3"

    telemetry = StageTelemetry(
        "moderation",
        "grp",
        StageMetrics("moderation"),
        client_id="conveyor-moderation-host-1",
        bootstrap="broker-0.kafka:9093,broker-1.kafka:9093",
    )
    span = telemetry.record_start(Msg(), {"traceparent": HOP}, record.event)  # type: ignore[arg-type]
    tracing.end_span(span)
    attrs = dict(spans(exported)[f"process {record.topic}"].attributes or {})
    assert attrs["messaging.client.id"] == "conveyor-moderation-host-1"
    assert attrs["server.address"] == "broker-0.kafka" and attrs["server.port"] == 9093
    assert attrs["messaging.kafka.message.key"] == "t-3"
    assert attrs["messaging.consumer.group.name"] == "grp"


def test_server_attributes_of_bootstrap_lists() -> None:
    assert tracing.server_attributes("127.0.0.1:9092") == {
        "server.address": "127.0.0.1",
        "server.port": 9092,
    }
    assert tracing.server_attributes("SASL_SSL://b:9094,c:9094") == {
        "server.address": "b",
        "server.port": 9094,
    }
    assert tracing.server_attributes("[::1]:9092")["server.address"] == "::1"
    assert tracing.server_attributes("") == {}


def test_resource_names_host_and_instance_and_the_environment_may_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("CONVEYOR_INSTANCE_ID", "pod-7")
    attrs = tracing.resource_attributes("notify")
    assert attrs["service.name"] == "conveyor-notify"
    assert attrs["service.instance.id"] == "pod-7"
    assert attrs["host.name"] and attrs["host.arch"]
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=x%2F1,k8s.pod.name=p")
    attrs = tracing.resource_attributes("notify")
    assert attrs["service.instance.id"] == "x/1" and attrs["k8s.pod.name"] == "p"


@pytest.mark.parametrize(
    ("sampler", "arg", "low", "high"),
    [
        ("parentbased_traceidratio", "0.25", 0.22, 0.28),
        ("traceidratio", "0.5", 0.46, 0.54),
        ("parentbased_always_off", "", 0.0, 0.0),
        ("parentbased_always_on", "", 1.0, 1.0),
        ("", "", 1.0, 1.0),
    ],
)
def test_a_minted_parent_is_sampled_as_the_configured_sampler_decides(
    monkeypatch: pytest.MonkeyPatch, sampler: str, arg: str, low: float, high: float
) -> None:
    if sampler:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    else:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg or "1.0")
    minted = [tracing.new_traceparent() for _ in range(4000)]
    assert all(tracing.remote_span(p) is not None for p in minted)
    share = sum(p.endswith("-01") for p in minted) / len(minted)
    assert low <= share <= high, share


def test_preprocess_observes_end_to_end_latency_from_the_submitted_event_time() -> None:
    metrics = StageMetrics("preprocess-e2e-test")
    telemetry = StageTelemetry("preprocess-e2e-test", "g", metrics)
    sent = (datetime.now(UTC) - timedelta(seconds=2)).isoformat()
    event = Event(id="e", type=INGRESS_TYPE, source="/t", subject="t-9", data={}, time=sent)
    record = item("t-9")
    record.event = event
    before = _count(metrics)
    telemetry.record_finish(RecordOutcome(record, []))
    assert _count(metrics) == before + 1
    # Another stage's input without a task block (e.g. a status event) observes nothing.
    record.event = Event(
        id="e2", type="conveyor.task.status.v1", source="/t", subject="t-9", data={}, time=sent
    )
    telemetry.record_finish(RecordOutcome(record, []))
    assert _count(metrics) == before + 1


def _count(metrics: StageMetrics) -> float:
    for family in E2E_LATENCY.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels["stage"] == metrics.stage:
                return sample.value
    raise AssertionError("no e2e histogram count")
