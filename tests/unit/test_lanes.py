"""Priority lane planning: higher lanes first, lower lanes never starved."""

from __future__ import annotations

from confluent_kafka import TopicPartition

from conveyor.runtime.lanes import LaneScheduler, plan

LANES = ["high", "normal", "low"]


def test_backlog_on_high_holds_back_normal_and_low() -> None:
    assert plan(LANES, {"high": 5, "normal": 9, "low": 9}, {}, {}, 0.0, 2.0) == {"normal", "low"}


def test_backlog_only_on_normal_holds_back_low_only() -> None:
    assert plan(LANES, {"high": 0, "normal": 3, "low": 9}, {}, {}, 0.0, 2.0) == {"low"}


def test_no_backlog_above_holds_nothing() -> None:
    assert plan(LANES, {"low": 9}, {}, {}, 0.0, 2.0) == set()
    assert plan(LANES, {}, {}, {}, 0.0, 2.0) == set()


def test_a_lane_held_longer_than_the_starvation_limit_is_served() -> None:
    since = {"normal": 0.0, "low": 1.5}
    assert plan(LANES, {"high": 5, "normal": 1, "low": 1}, since, {}, 2.5, 2.0) == {"low"}


def test_a_lane_in_its_serving_window_is_not_held() -> None:
    serving = {"normal": 3.0}
    assert plan(LANES, {"high": 5}, {}, serving, 2.5, 2.0) == {"low"}
    assert plan(LANES, {"high": 5}, {}, serving, 3.5, 2.0) == {"normal", "low"}


class FakeConsumer:
    """Two lane partitions with fixed high watermarks; positions move when a test says so."""

    def __init__(self) -> None:
        self.offsets = {"high": 0, "low": 0}
        self.paused: set[str] = set()

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(lane, 0) for lane in self.offsets]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, 0, self.offsets[tp.topic]) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, 1000

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.update(tp.topic for tp in tps)

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused.difference_update(tp.topic for tp in tps)


def test_a_starved_lane_stays_open_until_it_delivers_but_no_longer_than_the_limit() -> None:
    consumer = FakeConsumer()
    lanes = LaneScheduler(consumer, ["high", "low"], starvation_s=1.0)  # type: ignore[arg-type]
    lanes.before_poll(0.0, set())
    assert consumer.paused == {"low"}
    lanes.before_poll(1.0, set())  # held for the limit: its window opens
    assert consumer.paused == set()
    lanes.before_poll(1.6, set())  # past a quarter, but nothing delivered yet (a slow fetch)
    assert consumer.paused == set()
    consumer.offsets["low"] = 3  # it delivered
    lanes.before_poll(1.7, set())
    assert consumer.paused == {"low"}
    lanes.before_poll(2.7, set())  # starved again: a new window
    assert consumer.paused == set()
    lanes.before_poll(3.8, set())  # never delivered: closed after the limit
    assert consumer.paused == {"low"}
