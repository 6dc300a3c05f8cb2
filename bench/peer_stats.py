"""Figures of `bench/peers.py`: per-round ratios, medians with their spread, targets, markdown.

Ratios are taken within a round (both contenders ran minutes apart at most, under the same
neighbours), then summarised over rounds, so a shared machine's changing load moves them less
than it moves the absolute rates. Percentiles are nearest-rank.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# (name, numerator, denominator) of the same-round throughput ratios.
RATIOS = (
    ("conveyor_vs_quix", "conveyor_off", "quix"),
    ("conveyor_vs_quix_avro", "conveyor_off", "quix_avro"),  # only when run (--contenders)
    ("conveyor_vs_raw", "conveyor_off", "raw"),
    ("sampled_vs_off", "conveyor_sampled", "conveyor_off"),
    ("always_on_vs_off", "conveyor_on", "conveyor_off"),
)


def spread(values: Iterable[float | None], digits: int = 1) -> dict[str, Any] | None:
    """Median and range of the figures that exist; None when there are none."""
    got = [v for v in values if v is not None]
    if not got:
        return None

    def rounded(x: float) -> float:
        return round(x, digits) if digits else round(x)

    return {
        "median": rounded(statistics.median(got)),
        "min": rounded(min(got)),
        "max": rounded(max(got)),
        "rounds": len(got),
    }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile `q` (0-100) of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_ms(sent: Sequence[float], arrived: Sequence[float | None]) -> dict[str, float]:
    """p50 / p99 / max in ms from source produce call to sink arrival, over arrived records."""
    ordered = sorted((a - s) * 1e3 for s, a in zip(sent, arrived, strict=True) if a is not None)
    if not ordered:
        return {}
    return {
        "p50_ms": round(percentile(ordered, 50), 1),
        "p99_ms": round(percentile(ordered, 99), 1),
        "max_ms": round(ordered[-1], 1),
    }


def round_ratios(saturated: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per round: each ratio of RATIOS whose two contenders both finished that round."""
    rates: dict[int, dict[str, float]] = {}
    for name, rounds in saturated.items():
        for measured in rounds:
            if measured.get("records_per_s"):
                rates.setdefault(measured["round"], {})[name] = measured["records_per_s"]
    out = []
    for n in sorted(rates):
        got = rates[n]
        row: dict[str, Any] = {"round": n}
        for label, top, bottom in RATIOS:
            if top in got and bottom in got:
                row[label] = round(got[top] / got[bottom], 3)
        out.append(row)
    return out


def summarise(results: Mapping[str, Any], integrity: Mapping[str, Any]) -> dict[str, Any]:
    """The report's figures from the raw per-round rows."""
    saturated = results["saturated"]
    ratios = round_ratios(saturated)
    cpu = {n: [r.get("cpu_us_per_record_per_hop") for r in rows] for n, rows in saturated.items()}
    beyond = _beyond_raw(saturated)
    return {
        "records_per_s": {
            n: spread((r.get("records_per_s") for r in rows), 0) for n, rows in saturated.items()
        },
        "cpu_us_per_record_per_hop": {n: spread(v) for n, v in cpu.items()},
        "runtime_cpu_beyond_raw_us_per_record_per_hop": spread(beyond),
        "same_round_ratios": {
            label: spread((r.get(label) for r in ratios), 3)
            for label, top, bottom in RATIOS
            if top in saturated and bottom in saturated
        },
        "same_round_ratios_by_round": ratios,
        "latency": {
            rate: {
                n: {k: spread(r.get(k) for r in rows) for k in ("p50_ms", "p99_ms", "max_ms")}
                for n, rows in by_name.items()
            }
            for rate, by_name in results["latency"].items()
        },
        "pipelined_inference": {
            k: spread((r.get(k) for r in results["inference"]), 3)
            for k in ("ratio", "stage_records_per_s", "bare_model_records_per_s")
        },
        "integrity": integrity,
    }


def _beyond_raw(saturated: Mapping[str, list[dict[str, Any]]]) -> list[float]:
    """Per round: Conveyor (tracing off) CPU per record per hop minus the raw hop's."""
    raw = {r["round"]: r.get("cpu_us_per_record_per_hop") for r in saturated.get("raw", [])}
    out = []
    for row in saturated.get("conveyor_off", []):
        base, own = raw.get(row["round"]), row.get("cpu_us_per_record_per_hop")
        if base is not None and own is not None:
            out.append(own - base)
    return out


def targets(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """ARCHITECTURE.md §10 / issue 8 targets against the medians; unmeasured ones say so."""
    ratios = summary["same_round_ratios"]
    latency = summary["latency"]
    checks = [
        ("throughput >= 1.0x Quix Streams", _median(ratios.get("conveyor_vs_quix")), ">=", 1.0),
        (
            "throughput >= 0.5x raw confluent-kafka",
            _median(ratios.get("conveyor_vs_raw")),
            ">=",
            0.5,
        ),
        (
            "runtime CPU beyond the raw loop <= 20 us/record/hop",
            _median(summary["runtime_cpu_beyond_raw_us_per_record_per_hop"]),
            "<=",
            20.0,
        ),
        ("10% sampling <= 10% below tracing off", _median(ratios.get("sampled_vs_off")), ">=", 0.9),
        ("always-on <= 30% below tracing off", _median(ratios.get("always_on_vs_off")), ">=", 0.7),
        ("p99 <= 25 ms at 1,000/s", _p99(latency, "1000"), "<=", 25.0),
        ("p99 <= 10 ms at 200/s", _p99(latency, "200"), "<=", 10.0),
        (
            "pipelined inference >= 0.9x the bare model",
            _median(summary["pipelined_inference"]["ratio"]),
            ">=",
            0.9,
        ),
    ]
    out = []
    for name, value, op, bound in checks:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": name, "measured_median": value, "bound": bound, "met": met})
    return out


def _median(figure: Mapping[str, Any] | None) -> float | None:
    return None if figure is None else figure["median"]


def _p99(latency: Mapping[str, Any], rate: str) -> float | None:
    return _median(latency.get(rate, {}).get("conveyor_off", {}).get("p99_ms"))
