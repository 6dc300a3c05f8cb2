"""The alert rules fire when they should and stay silent on a quiet pipeline (promtool tests).

deploy/prometheus/conveyor-alerts.test.yml holds the firing cases, conveyor-alerts.quiet.test.yml
the quiet ones: an idle pipeline in at-least-once and in exactly-once delivery, and consumer-group
rebalances (KEDA scaling a stage out and in, then traffic stopping). These tests run both files
and keep them complete: every alert of the rules file has a firing case, and every quiet scenario
checks every alert, so a new alert cannot ship untested.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploysupport import ALERTS, PROMETHEUS, promtool_path, run

FIRING = PROMETHEUS / "conveyor-alerts.test.yml"
QUIET = PROMETHEUS / "conveyor-alerts.quiet.test.yml"
QUIET_WRITER = PROMETHEUS / "quiet_cases.py"
QUIET_SCENARIOS = (
    "idle pipeline, at-least-once delivery",
    "idle pipeline, exactly-once delivery",
    "rebalance: KEDA scales writeback out, then traffic stops",
    "rebalance: KEDA scales writeback in, then traffic stops",
)


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    return promtool_path()


def _alerts() -> set[str]:
    return {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}


def _cases(path: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for test in yaml.safe_load(path.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            yield test["name"], case


@pytest.mark.parametrize("tests_file", [FIRING, QUIET], ids=["firing", "quiet"])
def test_promtool_rule_tests_pass(promtool_bin: str, tests_file: Any) -> None:
    proc = run(promtool_bin, "test", "rules", tests_file.name, cwd=tests_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_case_where_it_fires() -> None:
    fired = {case["alertname"] for _, case in _cases(FIRING) if case.get("exp_alerts")}
    assert fired == _alerts(), f"alerts never shown firing: {sorted(_alerts() - fired)}"


def test_every_quiet_scenario_checks_every_alert_silent() -> None:
    checked: dict[str, set[str]] = {}
    for scenario, case in _cases(QUIET):
        assert not case.get("exp_alerts"), f"{scenario}: {case['alertname']} expected to fire"
        checked.setdefault(scenario, set()).add(case["alertname"])
    assert tuple(checked) == QUIET_SCENARIOS
    for scenario, alerts in checked.items():
        assert alerts == _alerts(), f"{scenario} leaves out {sorted(_alerts() - alerts)}"


def test_quiet_pipeline_series_cover_what_the_runtime_exports() -> None:
    """The idle scenarios expose the series a stage really has: lag per input and retry
    partition (all three lanes for inference), counters, gauges and the latency histogram."""
    idle = next(
        t for t in yaml.safe_load(QUIET.read_text())["tests"] if "exactly-once" in t["name"]
    )
    names = [s["series"] for s in idle["input_series"]]
    for metric in (
        "conveyor_events_consumed_total",
        "conveyor_events_emitted_total",
        "conveyor_retries_total",
        "conveyor_dead_letters_total",
        "conveyor_in_flight",
        "conveyor_paused_partitions",
        "conveyor_e2e_latency_seconds_bucket",
    ):
        assert any(n.startswith(metric + "{") for n in names), metric
    lags = [n for n in names if n.startswith("conveyor_consumer_lag{")]
    for lane in ("high", "normal", "low"):
        assert any(f'topic="conveyor.task.preprocessed.{lane}"' in n for n in lags), lane
    assert any(".retry." in n for n in lags)
    values = {s["values"] for s in idle["input_series"] if s["series"] in lags}
    assert values == {"0x60"}, "an idle stage reports lag 0 on every partition"


def test_quiet_cases_file_is_what_its_writer_writes() -> None:
    spec = importlib.util.spec_from_file_location("quiet_cases", QUIET_WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == QUIET.read_text(), (
        "conveyor-alerts.quiet.test.yml is stale: run python deploy/prometheus/quiet_cases.py"
    )
