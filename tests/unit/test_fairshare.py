"""Fair share: the read-ahead window (lanes, then deficit round robin over tenants), the commit
tracker (in order up to the lowest unfinished record), and a pipelined stage loop using both,
over fake clients."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from prometheus_client import REGISTRY

from conveyor.events.model import Event
from conveyor.kafka.consumer import KafkaConsumer
from conveyor.kafka.producer import KafkaProducer
from conveyor.ml.capacity import Plan
from conveyor.quota import QuotaSettings, TenantLimits, TenantQuota, gcra_wait
from conveyor.runtime.fairfeed import CommitTracker, FairShare
from conveyor.runtime.fairshare import FairWindow, TenantMetrics, tenant_of
from conveyor.runtime.handler import StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.eventdata import INFERRED_TOPIC, inferred_record
from tests.kafkafakes import FakeConsumerClient, FakeMessage, FakeProducerClient
from tests.unit.test_stage_step import moderated

HIGH, NORMAL, LOW = "lane.high", "lane.normal", "lane.low"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rec(tenant: str, offset: int, topic: str = NORMAL, partition: int = 0, size: int = 10) -> Any:
    headers: list[tuple[str, str | bytes | None]] = [
        ("ce_type", b"x"),
        ("ce_tenant", tenant.encode()),
    ]
    return FakeMessage(topic, partition, offset, b"v" * size, f"{tenant}{offset}".encode(), headers)


def window(**kw: Any) -> FairWindow:
    args: dict[str, Any] = {"max_records": 10_000, "max_bytes": 10**9, "starvation_s": 60.0}
    return FairWindow([HIGH, NORMAL, LOW], **{**args, **kw})


def tenants(batch: list[Any]) -> list[str]:
    return [tenant_of(m) for m in batch]


def test_two_busy_tenants_alternate_record_by_record_with_equal_weights() -> None:
    w = window()
    w.add([rec("a", i) for i in range(10)] + [rec("b", 10 + i) for i in range(3)], 0.0)
    assert tenants(w.take(6, 0.0)) == ["a", "b", "a", "b", "a", "b"]
    assert tenants(w.take(10, 0.0)) == ["a"] * 7  # b is done: a gets everything
    assert len(w) == 0 and w.take(4, 0.0) == []


def test_a_late_tenant_is_served_before_an_earlier_tenants_backlog() -> None:
    w = window()
    w.add([rec("a", i) for i in range(200)], 0.0)
    first = w.take(8, 0.0)
    w.add([rec("b", 200 + i) for i in range(5)], 1.0)
    served: list[str] = tenants(first)
    while len(w):
        served += tenants(w.take(8, 1.0))
    assert served.count("b") == 5 and served.count("a") == 200
    assert max(i for i, t in enumerate(served) if t == "b") < 8 + 10  # all five in two batches


def test_a_tenants_own_records_keep_their_order() -> None:
    w = window()
    w.add([rec("a" if i % 3 else "b", i) for i in range(30)], 0.0)
    taken = [m for _ in range(10) for m in w.take(4, 0.0)]
    for tenant in ("a", "b"):
        offsets = [m.offset() for m in taken if tenant_of(m) == tenant]
        assert offsets == sorted(offsets)


def test_weights_give_tenants_shares_in_proportion() -> None:
    w = window(weights={"big": 3.0})
    w.add([rec("big", i) for i in range(100)] + [rec("small", 100 + i) for i in range(100)], 0.0)
    served = [t for _ in range(10) for t in tenants(w.take(8, 0.0))]
    assert served.count("big") == 60 and served.count("small") == 20


def test_a_fractional_weight_accumulates_credit_over_turns() -> None:
    w = window(weights={"slow": 0.5})
    w.add([rec("slow", i) for i in range(50)] + [rec("fast", 50 + i) for i in range(50)], 0.0)
    served = [t for _ in range(6) for t in tenants(w.take(5, 0.0))]
    assert served.count("fast") == 20 and served.count("slow") == 10


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError):
        window(weights={"x": 0.0})


def test_a_batch_full_mid_turn_keeps_the_tenants_turn_and_credit() -> None:
    w = window(weights={"a": 4.0})
    w.add([rec("a", i) for i in range(10)] + [rec("b", 10 + i) for i in range(10)], 0.0)
    assert tenants(w.take(3, 0.0)) == ["a", "a", "a"]
    assert tenants(w.take(3, 0.0)) == ["a", "b", "a"]  # a's fourth credit, then b, then a again


def test_a_higher_lane_is_served_first_and_a_starved_lane_after_the_guard() -> None:
    w = window(starvation_s=5.0)
    w.add([rec("a", i, LOW) for i in range(4)], 0.0)
    w.add([rec("a", i, HIGH) for i in range(16)], 1.0)
    w.add([rec("b", i, NORMAL) for i in range(4)], 1.0)
    assert {m.topic() for m in w.take(8, 2.0)} == {HIGH}
    assert {m.topic() for m in w.take(8, 5.5)} == {LOW}  # waited 5.5 s >= 5 s: served first
    assert {m.topic() for m in w.take(8, 5.5)} == {HIGH}
    assert {m.topic() for m in w.take(8, 5.5)} == {NORMAL}


def test_a_lane_with_a_sustained_backlog_is_served_once_per_guard_interval_not_always() -> None:
    # A batch keeps the low lane full: its oldest record is always older than the guard. Low
    # gets one batch per interval; the rest of the time the higher lane goes first.
    w = window(starvation_s=2.0)
    w.add([rec("a", i, LOW) for i in range(100)], 0.0)
    w.add([rec("b", i, NORMAL) for i in range(100)], 0.0)
    assert {m.topic() for m in w.take(4, 2.0)} == {LOW}  # starved: one batch
    assert {m.topic() for m in w.take(4, 2.1)} == {NORMAL}
    assert {m.topic() for m in w.take(4, 3.9)} == {NORMAL}
    assert {m.topic() for m in w.take(4, 4.0)} == {LOW}  # 2 s since its last batch
    assert {m.topic() for m in w.take(4, 4.0)} == {NORMAL}


def test_topics_that_are_not_lanes_rank_below_them() -> None:
    w = window()
    w.add([rec("a", 0, "retry.1")], 0.0)
    w.add([rec("a", 0, LOW)], 0.0)
    assert [m.topic() for m in w.take(1, 0.0)] == [LOW]
    assert [m.topic() for m in w.take(1, 0.0)] == ["retry.1"]


def test_a_record_without_a_tenant_header_is_still_served() -> None:
    w = window()
    w.add([FakeMessage(NORMAL, 0, 0, b"x", b"k", [])], 0.0)
    assert len(w.take(4, 0.0)) == 1


def test_the_window_is_full_at_its_record_or_byte_bound() -> None:
    by_count = window(max_records=3)
    by_count.add([rec("a", i) for i in range(3)], 0.0)
    assert by_count.full
    by_count.take(1, 0.0)
    assert not by_count.full
    by_bytes = window(max_bytes=100)
    by_bytes.add([rec("a", 0, size=60)], 0.0)
    assert not by_bytes.full
    by_bytes.add([rec("a", 1, size=60)], 0.0)
    assert by_bytes.full and by_bytes.bytes == 120


def test_dropping_partitions_takes_only_their_records_out() -> None:
    w = window()
    w.add([rec("a", i, partition=i % 2) for i in range(10)], 0.0)
    w.add([rec("b", 10 + i, partition=1) for i in range(3)], 0.0)
    dropped = w.drop([(NORMAL, 1)])
    assert sorted(m.offset() for m in dropped) == [1, 3, 5, 7, 9, 10, 11, 12]
    assert len(w) == 5 and w.bytes == 50
    assert {m.partition() for m in w.take(10, 0.0)} == {0}
    w.add([rec("a", 20)], 0.0)
    assert len(w.drop()) == 1 and len(w) == 0 and w.bytes == 0


def test_served_counts_records_per_tenant() -> None:
    w = window()
    w.add([rec("a", i) for i in range(5)] + [rec("b", 5)], 0.0)
    w.take(4, 0.0)
    assert w.served == {"a": 3, "b": 1}


def test_the_tracker_commits_up_to_the_lowest_unfinished_record() -> None:
    t = CommitTracker()
    tp = (NORMAL, 0)
    t.read([rec("a", i) for i in range(5)])
    assert t.finish([(tp, 3), (tp, 4)]) == {tp: 0}
    assert t.finish([(tp, 0)]) == {tp: 1}
    assert t.finish([(tp, 1), (tp, 2)]) == {tp: 5}
    assert t.outstanding == 0


def test_a_dropped_record_holds_the_commit_before_it() -> None:
    t = CommitTracker()
    tp = (NORMAL, 0)
    t.read([rec("a", i) for i in range(10, 14)])
    # 11 was dropped from the window (never finished): the commit never passes it.
    assert t.finish([(tp, 10), (tp, 12), (tp, 13)]) == {tp: 11}
    t.forget([tp])
    assert t.outstanding == 0


# -- the stage loop with fair share ----------------------------------------------------------


def tenant_msgs(tenant: str, start: int, n: int) -> list[Any]:
    out = []
    for i in range(start, start + n):
        key, value, headers = inferred_record(f"{tenant}-{i}", tenant=tenant)
        out.append(FakeMessage(INFERRED_TOPIC, 0, i, value, key, list(headers)))
    return out


def make_runner(handle: Any, **env: Any) -> tuple[StageRunner, Any, Any]:
    service = StageService(
        "moderation", StageSettings, handle=handle, accepts=("conveyor.task.inferred.v1",)
    )
    settings = StageSettings(stage="moderation", pipelined=True, fair_share=True, **env)
    runner = StageRunner(service, settings)
    consumer, producer = FakeConsumerClient(), FakeProducerClient()
    runner.attach(KafkaConsumer(consumer), KafkaProducer(producer, delivery_timeout_s=1))
    runner.started = True
    return runner, consumer, producer


def test_a_fair_stage_serves_a_late_tenant_early_and_commits_in_order() -> None:
    gate = threading.Event()
    order: list[str] = []

    def handle(event: Event, _ctx: Any) -> Any:
        gate.wait(10)
        order.append(event.extensions["tenant"])
        return moderated(event)

    runner, consumer, producer = make_runner(handle, batch_max=4, fair_window=100)
    consumer.assigned = [TopicPartition(INFERRED_TOPIC, 0)]
    consumer.queued = tenant_msgs("a", 0, 40)
    runner.turn()  # 40 of a read: two batches go to the pipeline, the rest waits in the window
    consumer.queued = tenant_msgs("b", 40, 4)
    runner.turn()
    gate.set()
    deadline = time.monotonic() + 20
    while len(producer.records) < 44 and time.monotonic() < deadline:
        runner.turn()
    for _ in range(5):
        runner.turn()
    assert order.count("a") == 40 and order.count("b") == 4
    # b's four ran right after the two batches of a already in flight, not after a's 40.
    assert max(i for i, t in enumerate(order) if t == "b") < 8 + 8
    offsets = [c[0].offset for c in consumer.commits]
    assert offsets == sorted(offsets) and offsets[-1] == 44


def test_a_full_window_pauses_the_partitions_and_a_drained_one_resumes_them() -> None:
    gate = threading.Event()

    def handle(event: Event, _ctx: Any) -> Any:
        gate.wait(10)
        return moderated(event)

    runner, consumer, _producer = make_runner(handle, batch_max=2, fair_window=3)
    consumer.assigned = [TopicPartition(INFERRED_TOPIC, 0)]
    consumer.queued = tenant_msgs("a", 0, 8)
    runner.turn()  # 4 to the pipeline, 4 wait: over the window's 3
    runner.turn()
    assert consumer.paused == [(INFERRED_TOPIC, 0)]
    gate.set()
    deadline = time.monotonic() + 10
    while consumer.paused and time.monotonic() < deadline:
        runner.turn()
    assert consumer.paused == []


def test_a_revoke_drops_the_waiting_records_and_commits_before_the_first_of_them() -> None:
    gate, entered = threading.Event(), threading.Event()

    def handle(event: Event, _ctx: Any) -> Any:
        entered.set()
        gate.wait(10)
        return moderated(event)

    runner, consumer, producer = make_runner(handle, batch_max=2, fair_window=100)
    consumer.assigned = [TopicPartition(INFERRED_TOPIC, 0)]
    consumer.queued = tenant_msgs("a", 0, 10)
    runner.turn()  # two batches queued: the first cut (offsets 0-1) and running, 8 waiting
    assert entered.wait(10)
    threading.Timer(0.2, gate.set).start()  # the revoke waits for the running batch
    runner._on_revoke(None, [TopicPartition(INFERRED_TOPIC, 0)])
    # The queued batch was not cut yet: it finds the window emptied and runs nothing.
    assert len(producer.records) == 2
    assert consumer.commits[-1][0].offset == 2  # the new owner starts at the first unrun one
    assert runner._fair is not None and runner._fair.outstanding == 0


# -- quotas: a tenant over its quota is held in the window ------------------------------------


def test_a_tenant_over_its_in_flight_limit_waits_while_others_are_served() -> None:
    limits = TenantLimits(QuotaSettings(tenant_quotas={"a": TenantQuota(in_flight=2)}))
    w = window(admit=limits.admit)
    w.add([rec("a", i) for i in range(10)] + [rec("b", 10 + i) for i in range(10)], 0.0)
    assert tenants(w.take(6, 0.0)) == ["a", "b", "a", "b", "b", "b"]
    assert tenants(w.take(6, 0.0)) == ["b"] * 6
    assert w.take(6, 0.0) == [] and len(w) == 8  # a's 8 wait, none lost
    limits.finished("a")
    assert tenants(w.take(6, 0.0)) == ["a"]


def test_a_tenant_over_its_rate_is_paced_by_its_bucket() -> None:
    clock = Clock()
    quotas = QuotaSettings(tenant_quotas={"a": TenantQuota(rate=2.0, burst=3)})
    limits = TenantLimits(quotas, clock)
    w = window(admit=limits.admit)
    w.add([rec("a", i) for i in range(10)], 0.0)
    assert len(w.take(10, 0.0)) == 3  # the burst
    assert w.take(10, 0.0) == []
    clock.now += 1.0
    assert len(w.take(10, 0.0)) == 2  # two more a second later
    for _ in range(5):
        limits.finished("a")
    assert limits.running == {}


def test_a_lane_whose_tenants_are_all_held_gives_way_to_the_next_lane() -> None:
    limits = TenantLimits(QuotaSettings(tenant_quotas={"a": TenantQuota(in_flight=1)}))
    w = window(admit=limits.admit)
    w.add([rec("a", i, HIGH) for i in range(3)] + [rec("b", i, LOW) for i in range(3)], 0.0)
    assert [m.topic() for m in w.take(4, 0.0)] == [HIGH]
    assert [m.topic() for m in w.take(4, 0.0)] == [LOW] * 3


def test_the_default_rate_is_not_applied_at_the_stage() -> None:
    limits = TenantLimits(QuotaSettings(quota_rate=1.0, quota_burst=1), Clock())
    assert all(limits.admit("anyone") for _ in range(100))


def deadline_rec(tenant: str, offset: int, deadline: datetime | None) -> Any:
    msg = rec(tenant, offset)
    if deadline is not None:
        msg._headers.append(("ce_deadline", deadline.isoformat().encode()))
    return msg


def test_a_held_tenants_least_wait_follows_its_bucket() -> None:
    clock = Clock()
    limits = TenantLimits(QuotaSettings(tenant_quotas={"a": TenantQuota(rate=2.0, burst=3)}), clock)
    assert limits.wait("a", 0) is None  # under quota: it may start now
    assert all(limits.admit("a") for _ in range(3)) and not limits.admit("a")
    assert limits.wait("a", 0) == pytest.approx(0.5)  # one token every half second
    assert limits.wait("a", 4) == pytest.approx(2.5)
    assert gcra_wait(0.0, 10.0, 2.0, 3, 2) == 0.0  # a full bucket: the burst starts at once
    held = TenantLimits(QuotaSettings(tenant_quotas={"b": TenantQuota(in_flight=1)}))
    assert held.admit("b") and held.wait("b", 3) == 0.0  # held, when it frees is unknown
    held.finished("b")
    assert held.wait("b", 0) is None


def test_held_records_that_cannot_start_before_their_deadline_leave_the_window() -> None:
    wall = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    w = window()
    w.add(
        [
            deadline_rec("a", 0, wall + timedelta(seconds=1)),  # 0 s wait: still in time
            deadline_rec("a", 1, wall + timedelta(seconds=1)),  # 2 s wait: too late
            deadline_rec("a", 2, None),  # no deadline: waits as long as it takes
            deadline_rec("a", 3, wall - timedelta(seconds=1)),  # already past
            deadline_rec("b", 4, wall - timedelta(seconds=1)),  # not held: the handler decides
        ],
        0.0,
    )

    def wait(tenant: str, position: int) -> float | None:
        return None if tenant == "b" else 2.0 * position

    late = w.late(wall, wait)
    assert [(t, m.offset()) for t, m in late] == [("a", 1), ("a", 3)]
    assert len(w) == 3 and sorted(m.offset() for m in w.take(10, 0.0)) == [0, 2, 4]


def test_a_held_task_past_its_deadline_fails_with_reason_quota_and_is_committed() -> None:
    ran: list[str] = []

    def handle(event: Event, _ctx: Any) -> Any:
        ran.append(event.data["task"]["task_id"])
        return moderated(event)

    quotas = json.dumps({"a": {"in_flight": 1}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVEYOR_TENANT_QUOTAS", quotas)
        runner, consumer, producer = make_runner(handle, batch_max=4, quota_hold=True)
    assert runner._fair is not None
    runner._fair.finished = None  # the one running never finishes: a stays held
    consumer.assigned = [TopicPartition(INFERRED_TOPIC, 0)]
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    msgs = tenant_msgs("a", 0, 3)
    for msg in msgs:
        msg._headers.append(("ce_deadline", past.encode()))
    consumer.queued = msgs
    deadline = time.monotonic() + 20
    while len(consumer.commits) == 0 or consumer.commits[-1][0].offset < 3:
        assert time.monotonic() < deadline, consumer.commits
        runner.turn()
        time.sleep(0.01)
    assert ran == ["a-0"]  # admitted (in flight 1); the other two never ran
    statuses = [r for r in producer.records if r.topic.endswith("conveyor.task.status")]
    failed = [r for r in statuses if b"QuotaError" in r.value]
    assert len(failed) == 2
    assert sum(1 for r in producer.records if r.topic.endswith(".dlq")) == 2


# -- GPU-aware capacity sizes what the window hands the pipeline -------------------------------


class FakePipeline:
    def __init__(self) -> None:
        self.cuts: list[Any] = []

    @property
    def batches(self) -> int:
        return len(self.cuts)

    def defer(self, cut: Any) -> None:
        self.cuts.append(cut)


class FixedCapacity:
    def __init__(self, plan: Plan) -> None:
        self.current = plan

    def plan(self) -> Plan:
        return self.current


def test_the_capacity_plan_sizes_batches_and_in_flight_and_stops_reading_at_capacity() -> None:
    pipeline = FakePipeline()
    fair = FairShare(window(), pipeline, batch_max=32)
    fair.capacity = FixedCapacity(Plan(batch_size=5, max_in_flight=12, at_capacity=False))
    fair.add([rec("a", i) for i in range(40)], 0.0)
    fair.feed(0.0, "now")
    # 12 in flight at 5 a batch: two batches queued, each cut when the worker reaches it.
    assert [len(cut()) for cut in pipeline.cuts] == [5, 5]
    assert not fair.full
    fair.capacity.current = Plan(batch_size=5, max_in_flight=12, at_capacity=True)
    assert fair.full  # the stage pauses its partitions


def test_queue_wait_and_served_records_are_counted_per_tenant() -> None:
    def sample(name: str, tenant: str) -> float:
        labels = {"stage": "unit-fair", "tenant": tenant}
        return REGISTRY.get_sample_value(name, labels) or 0.0

    w = window()
    w.observe = TenantMetrics("unit-fair").observe
    w.add([rec("a", i) for i in range(3)], 10.0)
    w.add([rec("b", 3)], 11.0)
    w.take(4, 12.0)
    assert sample("conveyor_tenant_served_total", "a") == 3
    assert sample("conveyor_tenant_served_total", "b") == 1
    assert sample("conveyor_tenant_queue_wait_seconds_sum", "a") == pytest.approx(6.0)
    assert sample("conveyor_tenant_queue_wait_seconds_sum", "b") == pytest.approx(1.0)


def test_the_tracker_counts_each_unfinished_record_once() -> None:
    t = CommitTracker()
    t.read([rec("a", 0), rec("a", 1)])
    t.read([rec("a", 1)])  # read again after a seek
    assert t.outstanding == 2
    t.finish([((NORMAL, 0), 0), ((NORMAL, 0), 0)])
    assert t.outstanding == 1
