"""Priority lane planning: higher lanes first, lower lanes never starved."""

from __future__ import annotations

from conveyor.runtime.lanes import plan

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
