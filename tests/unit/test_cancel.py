"""Cancellation logic without a broker: the canceller's decisions (tenant scoping, idempotency,
no-op after completion, the race with completion), the gateway's DELETE, the cancel watch's
set and sync, the runtime's skip, inference leaving cancelled tasks out, and a generation
stopped at its next token (a tiny real GPT-2)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError
from starlette.testclient import TestClient

from conveyor.cancel import CANCEL_TOPIC, Canceller, CancelWatch, cancel_key
from conveyor.cancel.request import cancel_event_id
from conveyor.errors import BrokerError
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import STATUS_TOPIC
from conveyor.events.codec import decode
from conveyor.events.model import Event
from conveyor.kafka.producer import KafkaProducer
from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.services.inference.handler import InferenceResources
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.writeback.handler import WritebackResources
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.settings import KafkaSettings
from conveyor.store import ResultStore, TaskUpdate, open_store
from tests.kafkafakes import FakeMessage, FakeProducerClient
from tests.stages import context, infer, write_back
from tests.unit.test_handlers import FakeRegistry, preprocessed
from tests.unit.test_ml_tiny import tiny_dirs  # noqa: F401  (a session fixture)
from tests.unit.test_stage_step import make_runner, msgs

SETTINGS = KafkaSettings(topic_prefix="u.")
TOPIC = "u." + CANCEL_TOPIC
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LOG = logging.getLogger("test")


def seen(
    store: ResultStore,
    task_id: str,
    status: str = "processing",
    *,
    tenant: str = "acme",
    minute: int = 0,
    **fields: Any,
) -> None:
    store.apply(
        TaskUpdate(
            task_id=task_id,
            event_id=f"{tenant}-{task_id}-{status}-{minute}",
            event_type="conveyor.task.test.v1",
            status=status,
            time=T0 + timedelta(minutes=minute),
            tenant=tenant,
            kind="embed",
            callback_url="http://127.0.0.1:9/hook",
            **fields,
        )
    )


@pytest.fixture
def store() -> Iterator[ResultStore]:
    store = open_store("sqlite:///:memory:")
    yield store
    store.close()


@pytest.fixture
def producer() -> FakeProducerClient:
    return FakeProducerClient()


@pytest.fixture
def canceller(store: ResultStore, producer: FakeProducerClient) -> Canceller:
    return Canceller(
        SETTINGS, store, by="gateway", producer=KafkaProducer(producer, delivery_timeout_s=1)
    )


def status_events(producer: FakeProducerClient) -> list[Event]:
    schemas = default_schemas()
    return [
        decode(r.headers, r.value, schemas)  # type: ignore[arg-type]
        for r in producer.records
        if r.topic == "u." + STATUS_TOPIC
    ]


# -- the canceller ------------------------------------------------------------------------------


def test_a_running_task_is_cancelled_recorded_once_and_published_on_both_topics(
    store: ResultStore, canceller: Canceller, producer: FakeProducerClient
) -> None:
    seen(store, "t1")
    answer = canceller.cancel("t1", "acme")
    assert answer is not None and answer.cancelled
    assert answer.view()["status"] == "cancelled" and answer.view()["cancelled_at"]
    assert [r.topic for r in producer.records] == [TOPIC, "u." + STATUS_TOPIC]
    assert producer.records[0].key == cancel_key("acme", "t1")
    (event,) = status_events(producer)
    assert event.id == cancel_event_id("t1", "acme")
    assert (event.data["status"], event.data["tenant"]) == ("cancelled", "acme")
    assert event.data["callback_url"] == "http://127.0.0.1:9/hook"
    row = store.get("t1", tenant="acme")
    assert row is not None and row.status == "cancelled"
    assert [e.status for e in store.timeline("t1", tenant="acme")] == ["processing", "cancelled"]


def test_a_repeated_cancel_answers_the_same_and_republishes_the_same_records(
    store: ResultStore, canceller: Canceller, producer: FakeProducerClient
) -> None:
    seen(store, "t1")
    first = canceller.cancel("t1", "acme")
    second = canceller.cancel("t1", "acme")
    assert first is not None and second is not None
    assert first.view() == second.view()
    events = status_events(producer)
    assert len(events) == 2 and events[0].id == events[1].id  # deduplicated downstream
    keys = [r.key for r in producer.records if r.topic == TOPIC]
    assert keys == [cancel_key("acme", "t1")] * 2
    statuses = [e.status for e in store.timeline("t1", tenant="acme")]
    assert statuses.count("cancelled") == 1


def test_another_tenants_task_or_an_unknown_id_is_not_found_and_left_alone(
    store: ResultStore, canceller: Canceller, producer: FakeProducerClient
) -> None:
    seen(store, "t1", tenant="acme")
    assert canceller.cancel("t1", "beta") is None
    assert canceller.cancel("nope", "acme") is None
    row = store.get("t1", tenant="acme")
    assert row is not None and row.status == "processing"
    assert producer.records == []


def test_a_cancel_after_completion_is_a_no_op_that_says_so(
    store: ResultStore, canceller: Canceller, producer: FakeProducerClient
) -> None:
    seen(store, "t1")
    seen(store, "t1", "completed", minute=1, result={"model": "m"}, verdict="allow")
    answer = canceller.cancel("t1", "acme")
    assert answer is not None and not answer.cancelled
    assert answer.view()["status"] == "completed" and answer.view()["cancelled_at"] is None
    assert producer.records == []
    assert [e.status for e in store.timeline("t1", tenant="acme")] == ["processing", "completed"]


def test_the_pipeline_finishing_after_the_cancel_changes_nothing(
    store: ResultStore, canceller: Canceller
) -> None:
    seen(store, "t1")
    assert (answer := canceller.cancel("t1", "acme")) is not None and answer.cancelled
    seen(store, "t1", "completed", minute=99, result={"model": "m"}, verdict="allow")
    row = store.get("t1", tenant="acme")
    assert row is not None and row.status == "cancelled" and row.result is None


def test_a_broker_failure_accepts_nothing_and_the_retry_publishes(
    store: ResultStore, producer: FakeProducerClient, canceller: Canceller
) -> None:
    seen(store, "t1")
    producer.fail = KafkaError(KafkaError._MSG_TIMED_OUT)
    with pytest.raises(BrokerError):
        canceller.cancel("t1", "acme")
    producer.fail = None
    answer = canceller.cancel("t1", "acme")
    assert answer is not None and answer.cancelled
    assert len(status_events(producer)) == 2  # the failed attempt's and the retry's


def test_writeback_turns_the_cancel_event_into_one_stored_event(
    store: ResultStore, canceller: Canceller, producer: FakeProducerClient
) -> None:
    seen(store, "t1")
    canceller.cancel("t1", "acme")
    (event,) = status_events(producer)
    ctx = context(WritebackSettings(stage="writeback"), WritebackResources(store=store))
    (stored,) = write_back([event], ctx)
    assert stored is not None and not isinstance(stored, BaseException)
    assert stored.data["status"] == "cancelled"  # type: ignore[union-attr]
    assert stored.data["task"]["callback_url"] == "http://127.0.0.1:9/hook"  # type: ignore[union-attr]
    statuses = [e.status for e in store.timeline("t1", tenant="acme")]
    assert statuses.count("cancelled") == 1


# -- the gateway --------------------------------------------------------------------------------


@pytest.fixture
def client(store: ResultStore, canceller: Canceller) -> Iterator[TestClient]:
    from tests.unit.test_gateway import FakePublisher

    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme", "tok-beta": "beta"}, store_url="sqlite:///:memory:"
    )
    gateway = Gateway(
        settings,
        publisher=FakePublisher(),
        store=store,
        queue_estimate=lambda: None,
        canceller=canceller,
    )
    with TestClient(build_app(gateway)) as test_client:
        yield test_client


ACME = {"Authorization": "Bearer tok-acme"}
BETA = {"Authorization": "Bearer tok-beta"}


def test_delete_cancels_the_tenants_task_and_a_repeat_answers_the_same(
    client: TestClient, store: ResultStore
) -> None:
    seen(store, "t1")
    first = client.delete("/v1/tasks/t1", headers=ACME)
    second = client.delete("/v1/tasks/t1", headers=ACME)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["cancelled"] is True and first.json()["status"] == "cancelled"
    view = client.get("/v1/tasks/t1", headers=ACME).json()
    assert view["status"] == "cancelled"
    assert [e["status"] for e in view["timeline"]].count("cancelled") == 1


def test_delete_of_another_tenants_task_is_404_like_get_and_without_a_token_401(
    client: TestClient, store: ResultStore
) -> None:
    seen(store, "t1")
    assert client.delete("/v1/tasks/t1", headers=BETA).status_code == 404
    assert client.get("/v1/tasks/t1", headers=BETA).status_code == 404
    assert client.delete("/v1/tasks/t1").status_code == 401
    assert client.get("/v1/tasks/t1", headers=ACME).json()["status"] == "processing"


def test_delete_after_completion_is_409_and_says_the_status(
    client: TestClient, store: ResultStore
) -> None:
    seen(store, "t1")
    seen(store, "t1", "completed", minute=1, result={"model": "m"}, verdict="allow")
    answer = client.delete("/v1/tasks/t1", headers=ACME)
    assert answer.status_code == 409
    body = answer.json()
    assert (body["cancelled"], body["status"]) == (False, "completed") and body["error"]
    assert client.get("/v1/tasks/t1", headers=ACME).json()["status"] == "completed"


def test_openapi_describes_the_cancel(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    delete = doc["paths"]["/v1/tasks/{task_id}"]["delete"]
    assert {"200", "401", "404", "409", "503"} <= set(delete["responses"])
    assert "cancelled" in doc["components"]["schemas"]["Cancelled"]["required"]


# -- the cancel watch ---------------------------------------------------------------------------


class FakeCancelTopic:
    """A one-partition cancel topic as the watch's consumers see it."""

    def __init__(self, records: list[tuple[bytes, bytes | None]]) -> None:
        self.records = records
        self.assigned = False
        self.served = 0
        self.closed = False

    def __call__(self, _conf: dict[str, Any]) -> FakeCancelTopic:
        return self  # the reading consumer and the probe share the fake log

    def list_topics(self, topic: str, timeout: float = -1) -> Any:
        meta = SimpleNamespace(error=None, partitions={0: None})
        return SimpleNamespace(topics={topic: meta})

    def get_watermark_offsets(self, _tp: Any, timeout: float = -1, cached: bool = False) -> Any:
        return 0, len(self.records)

    def assign(self, _partitions: list[Any]) -> None:
        self.assigned = True

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        fresh = self.records[self.served :]
        if not fresh:
            time.sleep(min(timeout, 0.01))
            return []
        start, self.served = self.served, len(self.records)
        return [
            FakeMessage(TOPIC, 0, start + n, value, key) for n, (key, value) in enumerate(fresh)
        ]

    def close(self) -> None:
        self.closed = True


def watch_over(records: list[tuple[bytes, bytes | None]]) -> tuple[CancelWatch, FakeCancelTopic]:
    topic = FakeCancelTopic(records)
    return CancelWatch(SETTINGS, name="test", consumer_factory=topic), topic


def test_the_watch_reads_the_topic_to_its_end_before_it_starts_and_honours_tombstones() -> None:
    watch, topic = watch_over(
        [
            (cancel_key("acme", "a"), b"{}"),
            (cancel_key("acme", "b"), b"{}"),
            (cancel_key("acme", "b"), None),
        ]
    )
    try:
        assert watch.start(wait_s=5)
        assert watch.contains("acme", "a") and not watch.contains("acme", "b")
        assert not watch.contains("beta", "a")  # another tenant's equal id is another task
        topic.records.append((cancel_key("beta", "a"), b"{}"))
        assert watch.sync(5) and watch.contains("beta", "a")
        assert watch.visible_at("beta", "a") is not None
    finally:
        watch.stop()
    assert topic.closed


def test_sync_waits_for_what_the_broker_holds_and_reports_a_timeout() -> None:
    watch, topic = watch_over([])
    gate = threading.Event()
    original = topic.consume

    def slow(num_messages: int = 1, timeout: float = -1) -> list[Any]:
        return original(num_messages, timeout) if gate.is_set() else []

    topic.consume = slow  # type: ignore[method-assign]
    try:
        assert watch.start(wait_s=5)  # empty topic: nothing to wait for
        topic.records.append((cancel_key("acme", "late"), b"{}"))
        assert not watch.sync(0.2)  # held at the broker, not read yet
        gate.set()
        assert watch.sync(5) and watch.contains("acme", "late")
    finally:
        watch.stop()


def filled_watch(*tasks: tuple[str, str]) -> CancelWatch:
    watch = CancelWatch(SETTINGS, name="test")
    watch.apply([FakeMessage(TOPIC, 0, n, b"{}", cancel_key(*t)) for n, t in enumerate(tasks)])
    return watch


def test_only_work_events_of_a_cancelled_task_are_skipped() -> None:
    watch = filled_watch(("acme", "t-1"))
    work = preprocessed("t-1")
    assert watch.skips(work)
    assert not watch.skips(preprocessed("t-2"))
    status = Event("s", "conveyor.task.status.v1", "/x", "t-1", {"task_id": "t-1"})
    stored = Event("s", "conveyor.task.stored.v1", "/x", "t-1", {"task": {"task_id": "t-1"}})
    assert not watch.skips(status) and not watch.skips(stored)  # the outcome always passes


def test_the_runtime_skips_a_cancelled_tasks_records_and_commits_past_them() -> None:
    handled: list[str] = []

    def handle(event: Event, _ctx: Any) -> None:
        handled.append(str(event.subject))

    runner, consumer, producer = make_runner(handle=handle)
    runner.step.cancels = filled_watch(("acme", "t0-1"))
    runner.process(msgs(3))
    assert handled == ["t0-0", "t0-2"]
    assert consumer.commits[-1][0].offset == 3  # the skipped record is committed past


# -- inference ----------------------------------------------------------------------------------


def test_inference_runs_no_model_for_a_cancelled_task_and_emits_nothing_for_it() -> None:
    registry = FakeRegistry()
    events = [preprocessed("a"), preprocessed("b"), preprocessed("c", kind="generate")]
    watch = filled_watch(("acme", "b"), ("acme", "c"))
    resources = InferenceResources(models=registry)  # type: ignore[arg-type]
    ctx = context(InferenceSettings(stage="inference"), resources, cancels=watch)
    out = infer(events, ctx)
    assert registry.calls == [("embed", 1)]  # b and c never reached a model
    assert out[0] is not None and out[1] is None and out[2] is None


class StoppableModel:
    """A generate model that reads its records' cancel flags once per token step, as the
    stopping criterion does; `on_step` runs before each step's check."""

    def __init__(self, on_step: Any) -> None:
        self.on_step = on_step
        self.steps: list[int] = []

    def generate(self, prompts: list[str], params: list[Any], *, cancelled: Any) -> list[str]:
        texts = []
        for flag in cancelled:
            step = 0
            while step < 10:
                step += 1
                self.on_step(step)
                if flag():
                    break
            self.steps.append(step)
            texts.append("x" * step)
        return texts


def test_a_generation_cancelled_while_it_runs_stops_at_the_next_step_and_emits_nothing() -> None:
    watch = filled_watch()

    def on_step(step: int) -> None:
        if step == 3:  # the cancel reaches the stage while the model runs
            watch.apply([FakeMessage(TOPIC, 0, 0, b"{}", cancel_key("acme", "g"))])

    model = StoppableModel(on_step)
    registry = FakeRegistry()
    registry.for_kind = lambda kind, name: model  # type: ignore[method-assign]
    resources = InferenceResources(models=registry)  # type: ignore[arg-type]
    ctx = context(InferenceSettings(stage="inference"), resources, cancels=watch)
    (out,) = infer([preprocessed("g", kind="generate")], ctx)
    assert model.steps == [3]  # stopped at the step where the cancel was visible
    assert out is None


# -- a real (tiny) generation -------------------------------------------------------------------


def test_a_real_generation_stops_the_cancelled_row_at_its_next_token_and_not_the_others(
    tiny_dirs: dict[str, Any],  # noqa: F811  (the imported fixture)
) -> None:
    from conveyor.ml.generator import Generator, GenParams
    from conveyor.ml.registry import ModelSpec

    spec = ModelSpec(
        name="tiny-gpt2",
        kind="generate",
        source=str(tiny_dirs["gpt2"]),
        device="cpu",
        max_batch_size=4,
        max_new_tokens=24,
    )
    generator = Generator.from_spec(spec)
    prompts = ["tell me about kafka", "what is a model"]
    params = [GenParams(max_new_tokens=24)] * 2
    full = generator.generate(prompts, params)
    reads = 0

    def cancelled_at_third_token() -> bool:
        nonlocal reads
        reads += 1
        return reads >= 3

    cut = generator.generate(prompts, params, cancelled=[cancelled_at_third_token, None])

    def tokens(text: str) -> int:
        return len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])

    assert cut[1] == full[1]  # the other row ran to its end
    assert reads == 3  # read once per token until it said stop, never after
    assert full[0].startswith(cut[0]) and tokens(cut[0]) <= 3 < tokens(full[0])


def test_a_chunk_whose_records_are_all_cancelled_never_reaches_the_model(
    tiny_dirs: dict[str, Any],  # noqa: F811  (the imported fixture)
) -> None:
    from conveyor.ml.generator import Generator, GenParams
    from conveyor.ml.registry import ModelSpec

    spec = ModelSpec(name="g", kind="generate", source=str(tiny_dirs["gpt2"]), device="cpu")
    generator = Generator.from_spec(spec)
    calls = 0
    real = generator.model.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    generator.model.generate = counted
    params = [GenParams(max_new_tokens=8)] * 2
    assert generator.generate(["a", "b"], params, cancelled=[lambda: True] * 2) == ["", ""]
    assert calls == 0
    generator.generate(["a", "b"], params, cancelled=[lambda: True, None])
    assert calls == 1  # one record left to run: the chunk runs, the cancelled row stops at once
