"""Write conveyor-alerts.quiet.test.yml: the alert rules' quiet cases, from what stages export.

    python deploy/prometheus/quiet_cases.py      # rewrites the file next to this script

Each scenario lists the series a healthy pipeline exposes (libs/conveyor/telemetry/metrics.py, with
the target labels the chart's ServiceMonitor adds) and expects no alert at all, for every alert of
conveyor-alerts.yml. tests/unit/test_alert_rules.py runs promtool on the file and checks it is what
this script writes, so change the scenarios here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "conveyor-alerts.yml"
OUTPUT = HERE / "conveyor-alerts.quiet.test.yml"
# Input topics per stage (the three priority lanes for inference).
STAGES = {
    "preprocess": ["conveyor.task.submitted"],
    "inference": [f"conveyor.task.preprocessed.{lane}" for lane in ("high", "normal", "low")],
    "moderation": ["conveyor.task.inferred"],
    "writeback": ["conveyor.task.moderated"],
    "notify": ["conveyor.task.stored"],
}
SERVICES = [*STAGES, "gateway"]
MINUTES = 60
RUNGS = (1, 2, 3)

HEADER = """\
# Quiet cases of the alert rules: no alert may fire on a healthy pipeline that has nothing to do,
# in either delivery mode, nor during and after a consumer-group rebalance.
#   promtool test rules deploy/prometheus/conveyor-alerts.quiet.test.yml
# Written by quiet_cases.py (edit the scenarios there, then run it).
#
# The series are what the runtime exports (libs/conveyor/telemetry/metrics.py) with the labels the
# chart's ServiceMonitor adds (namespace, job, pod, instance): per stage its consumed/emitted
# counters, retries and dead letters (left over from earlier traffic), in-flight and paused gauges,
# the end-to-end latency histogram (an earlier slow burst above the 60 s objective, no observation
# since), and the lag of every assigned partition: input topics (all three lanes for inference)
# and retry rungs. An idle stage reports lag 0 on all of them in both delivery modes: the
# exactly-once runtime counts a transaction's commit marker as consumed (it used to report 1 per
# partition, which made ConveyorStageStalled fire on a quiet pipeline). In the at-least-once case
# notify is a pod restarted into the quiet: it has no counter series yet (they appear on first
# use), only its lag, gauges and an empty histogram. A pod drops the lag series of partitions it
# loses in a rebalance, so they end (stale) instead of lingering.
rule_files:
  - conveyor-alerts.yml
evaluation_interval: 1m
tests:"""

Series = tuple[str, str]  # (name{labels}, promtool values)


def _series(name: str, labels: dict[str, object], values: str) -> Series:
    rendered = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return f"{name}{{{rendered}}}", values


def _up(ns: str) -> list[Series]:
    return [
        _series(
            "up",
            {
                "namespace": ns,
                "job": f"conveyor-{svc}",
                "pod": f"conveyor-{svc}-7d9f-a",
                "instance": f"10.0.{i}.1:9100",
            },
            f"1x{MINUTES}",
        )
        for i, svc in enumerate(SERVICES)
    ]


def _idle_stage(ns: str, n: int, stage: str, *, fresh: bool) -> list[Series]:
    labels = {
        "namespace": ns,
        "job": f"conveyor-{stage}",
        "pod": f"conveyor-{stage}-7d9f-a",
        "stage": stage,
    }
    flat = f"x{MINUTES}"
    out: list[Series] = []
    for topic in STAGES[stage]:
        if not fresh:
            out.append(
                _series(
                    "conveyor_events_consumed_total",
                    {**labels, "topic": topic},
                    f"{4000 + n}{flat}",
                )
            )
        for partition in (0, 1):
            out.append(
                _series(
                    "conveyor_consumer_lag",
                    {**labels, "topic": topic, "partition": partition},
                    f"0{flat}",
                )
            )
    for rung in RUNGS:
        retry = {**labels, "topic": f"conveyor.{stage}.retry.{rung}", "partition": 0}
        out.append(_series("conveyor_consumer_lag", retry, f"0{flat}"))
    out.append(_series("conveyor_in_flight", labels, f"0{flat}"))
    out.append(_series("conveyor_paused_partitions", labels, f"0{flat}"))
    if fresh:
        # A pod restarted into the quiet: counters appear only once used, the histogram at 0.
        for le in ("60", "120", "+Inf"):
            out.append(
                _series("conveyor_e2e_latency_seconds_bucket", {**labels, "le": le}, f"0{flat}")
            )
        return out
    status = {**labels, "topic": "conveyor.task.status"}
    out.append(_series("conveyor_events_emitted_total", status, f"{40 + n}{flat}"))
    out.append(_series("conveyor_retries_total", {**labels, "rung": 1}, f"{12 + n}{flat}"))
    dead = {**labels, "reason": "PermanentError"}
    out.append(_series("conveyor_dead_letters_total", dead, f"{3 + n}{flat}"))
    # A slow burst earlier left observations above the 60 s objective; none since.
    for le, count in (("60", 3600), ("120", 4000), ("+Inf", 4000 + n)):
        bucket = {**labels, "le": le}
        out.append(_series("conveyor_e2e_latency_seconds_bucket", bucket, f"{count}{flat}"))
    return out


def idle(ns: str, *, skip: Iterable[str] = (), fresh: Iterable[str] = ()) -> list[Series]:
    out = _up(ns)
    for n, stage in enumerate(STAGES):
        if stage not in skip:
            out += _idle_stage(ns, n, stage, fresh=stage in fresh)
    return out


def _writeback_lag(pod: dict[str, str], partition: int, values: str) -> Series:
    labels = {**pod, "topic": "conveyor.task.moderated", "partition": partition}
    return _series("conveyor_consumer_lag", labels, values)


def rebalance(ns: str, *, scale_out: bool) -> list[Series]:
    """Writeback under traffic until 30m, KEDA changing its pods at 20m; the rest idle."""
    out = idle(ns, skip=("writeback",))
    base = {"namespace": ns, "job": "conveyor-writeback", "stage": "writeback"}
    a = {**base, "pod": "conveyor-writeback-7d9f-a"}
    b = {**base, "pod": "conveyor-writeback-7d9f-b"}
    topic = {"topic": "conveyor.task.moderated"}
    if scale_out:
        # Pod b joins at 20m and takes partitions 3-5 from pod a, which drops their series.
        out.append(_series("up", {**b, "instance": "10.0.9.2:9100"}, "_x20 1x40"))
        out.append(_series("conveyor_events_consumed_total", {**a, **topic}, "0+120x30 3600x30"))
        out.append(_series("conveyor_events_consumed_total", {**b, **topic}, "_x20 0+60x10 600x30"))
        out += [_writeback_lag(a, p, "2x30 0x30") for p in (0, 1, 2)]
        for p in (3, 4, 5):
            out.append(_writeback_lag(a, p, "2x19 stale"))
            out.append(_writeback_lag(b, p, "_x20 1x10 0x30"))
    else:
        # Pod b leaves at 20m; pod a takes partitions 3-5 over; b's series end with it.
        out.append(_series("up", {**b, "instance": "10.0.9.2:9100"}, "1x19 stale"))
        consumed = "0+60x20 1200+120x10 2400x30"
        out.append(_series("conveyor_events_consumed_total", {**a, **topic}, consumed))
        out.append(_series("conveyor_events_consumed_total", {**b, **topic}, "0+60x19 stale"))
        out += [_writeback_lag(a, p, "1x30 0x30") for p in (0, 1, 2)]
        for p in (3, 4, 5):
            out.append(_writeback_lag(b, p, "1x19 stale"))
            out.append(_writeback_lag(a, p, "_x20 3x10 0x30"))
    for rung in RUNGS:
        retry = {**a, "topic": f"conveyor.writeback.retry.{rung}", "partition": 0}
        out.append(_series("conveyor_consumer_lag", retry, f"0x{MINUTES}"))
    out.append(_series("conveyor_dead_letters_total", {**a, "reason": "PermanentError"}, "7x60"))
    out.append(_series("conveyor_retries_total", {**a, "rung": 1}, "30x60"))
    for le in ("60", "120", "+Inf"):
        bucket = {**a, "le": le}
        out.append(_series("conveyor_e2e_latency_seconds_bucket", bucket, "0+100x30 3000x30"))
    return out


def _alerts() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def _test(name: str, series: list[Series], eval_times: Iterable[str]) -> list[str]:
    lines = [f"  - name: '{name}'", "    interval: 1m", "    input_series:"]
    for selector, values in series:
        lines += [f"      - series: '{selector}'", f"        values: '{values}'"]
    lines.append("    alert_rule_test:")
    for at in eval_times:
        for alert in _alerts():
            lines.append(f"      - {{eval_time: {at}, alertname: {alert}, exp_alerts: []}}")
    return lines


def render() -> str:
    lines = [HEADER]
    lines += _test(
        "idle pipeline, at-least-once delivery",
        idle("prod", fresh=("notify",)),
        ("15m", "30m", "60m"),
    )
    lines += _test("idle pipeline, exactly-once delivery", idle("prod-eos"), ("15m", "30m", "60m"))
    lines += _test(
        "rebalance: KEDA scales writeback out, then traffic stops",
        rebalance("prod", scale_out=True),
        ("25m", "45m", "60m"),
    )
    lines += _test(
        "rebalance: KEDA scales writeback in, then traffic stops",
        rebalance("prod", scale_out=False),
        ("25m", "45m", "60m"),
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    sys.exit(0)
