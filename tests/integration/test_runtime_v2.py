"""Runtime v2 against the real broker: failure isolation inside a batch, `/healthz` while the
broker is away, and lag on an idle exactly-once input.

Stages run in-process as `StageRunner` threads (stage `moderation`, consuming
`conveyor.task.inferred.v1`) with small test handlers.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from confluent_kafka import Producer

from conveyor.broker.local import LocalBroker
from conveyor.events.model import Event
from conveyor.runtime import Emit, StageContext, StageService
from conveyor.runtime.health import HealthServer
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.eventdata import INFERRED, MODERATED, inferred_record
from tests.integration.test_ladder import moderated
from tests.support import apply, produce_raw, read_topics

pytestmark = pytest.mark.broker


class Stage:
    """A moderation stage running on a thread; `stop()` joins it and re-raises its failure."""

    def __init__(self, service: StageService[Any], settings: StageSettings) -> None:
        self.runner = StageRunner(service, settings)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:
            self.errors.append(exc)

    def wait(self, what: str, check: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "stage did not stop within 60 s"
        assert not self.errors, self.errors


@pytest.fixture
def stages() -> Iterator[list[Stage]]:
    running: list[Stage] = []
    yield running
    for stage in running:
        stage.stop()


def settings(bootstrap: str, prefix: str, **extra: Any) -> StageSettings:
    return StageSettings(
        stage="moderation", kafka_bootstrap=bootstrap, topic_prefix=prefix, **extra
    )


def test_one_record_raising_inside_a_batch_of_32_alone_climbs_the_ladder(
    kafka_bootstrap: str, topic_prefix: str, stages: list[Stage]
) -> None:
    apply(kafka_bootstrap, topic_prefix, partitions=1)  # one partition: one batch of 32
    ids = [f"iso-{i:02d}" for i in range(32)]
    produce_raw(kafka_bootstrap, topic_prefix + "conveyor.task.inferred", map(inferred_record, ids))
    batches: list[list[str | None]] = []

    def handle_batch(events: Sequence[Event], _ctx: StageContext[StageSettings]) -> list[Emit]:
        batches.append([e.subject for e in events])
        if any(e.subject == "iso-13" for e in events):
            raise RuntimeError("iso-13 breaks the model")
        return [Emit(MODERATED, moderated(e)) for e in events]

    service = StageService(
        "moderation", StageSettings, handle_batch=handle_batch, accepts=(INFERRED,)
    )
    # A 60 s first rung: the failed record stays on rung 1 for the whole test.
    conf = settings(
        kafka_bootstrap, topic_prefix, batch_max=32, batch_wait_ms=2000, retry_delays=[60.0]
    )
    stages.append(Stage(service, conf))
    out = read_topics(
        kafka_bootstrap, [topic_prefix + "conveyor.task.moderated"], expect=31, settle_s=1.0
    )
    retried = read_topics(
        kafka_bootstrap, [topic_prefix + "conveyor.moderation.retry.1"], expect=1, settle_s=1.0
    )
    # iso-13 raised inside a batch with others (all 32 at once, unless a consumer event or a
    # split fetch cut the first poll short: the batch is then one or two records smaller).
    raised = next(b for b in batches if "iso-13" in b)
    assert len(raised) >= 16, batches
    assert sorted(m.key().decode() for m in out) == [i for i in ids if i != "iso-13"]
    assert [m.key().decode() for m in retried] == ["iso-13"]


def _health(address: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_health(address: str, code: int, timeout_s: float) -> float:
    started = time.monotonic()
    while _health(address) != code:
        assert time.monotonic() - started < timeout_s, f"/healthz never answered {code}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_broker_stopped_under_an_idle_stage_fails_healthz_within_the_bound_and_recovers(
    kafka_broker: LocalBroker, topic_prefix: str, stages: list[Stage]
) -> None:
    bootstrap = kafka_broker.bootstrap
    apply(bootstrap, topic_prefix)
    service = StageService(
        "moderation",
        StageSettings,
        handle=lambda e, _ctx: Emit(MODERATED, moderated(e)),
        accepts=(INFERRED,),
    )
    stage = Stage(service, settings(bootstrap, topic_prefix, broker_down_s=3.0))
    stages.append(stage)
    health = HealthServer("127.0.0.1", 0, stage.runner.healthy, stage.runner.ready)
    health.start()
    try:
        stage.wait("the stage to be ready", stage.runner.ready, 60)
        assert _health(health.address) == 200
        kafka_broker.stop()
        # librdkafka notices every broker gone within a few seconds, then broker_down_s.
        _wait_health(health.address, 503, timeout_s=3.0 + 30)
        kafka_broker.restart()
        _wait_health(health.address, 200, timeout_s=60)
        produce_raw(bootstrap, topic_prefix + "conveyor.task.inferred", [inferred_record("back")])
        out = read_topics(bootstrap, [topic_prefix + "conveyor.task.moderated"], expect=1)
        assert [m.key() for m in out] == [b"back"]  # and it works again
    finally:
        health.stop()


def test_an_idle_stage_reading_exactly_once_input_reports_lag_zero(
    kafka_bootstrap: str, topic_prefix: str, stages: list[Stage]
) -> None:
    apply(kafka_bootstrap, topic_prefix, partitions=1)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{topic_prefix}upstream"}
    )
    producer.init_transactions(30)
    for batch in range(3):  # each transaction ends with a commit marker on the partition
        producer.begin_transaction()
        for i in range(5):
            key, value, headers = inferred_record(f"eos-{batch}-{i}")
            producer.produce(topic_prefix + "conveyor.task.inferred", value, key, headers=headers)
        producer.commit_transaction(30)
    service = StageService(
        "moderation",
        StageSettings,
        handle=lambda e, _ctx: Emit(MODERATED, moderated(e)),
        accepts=(INFERRED,),
    )
    stage = Stage(service, settings(kafka_bootstrap, topic_prefix))
    stages.append(stage)
    out = read_topics(
        kafka_bootstrap, [topic_prefix + "conveyor.task.moderated"], expect=15, settle_s=1.0
    )
    assert len(out) == 15
    lag = stage.runner._lag
    assert lag is not None
    inferred = (topic_prefix + "conveyor.task.inferred", 0)

    def settled() -> bool:
        return lag.refresh().get(inferred) == 0

    stage.wait("lag 0 on the exactly-once input", settled, timeout_s=30)
