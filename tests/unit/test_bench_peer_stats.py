"""The peer benchmark's arithmetic (bench/peer_stats.py): percentiles, ratios, targets."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from peer_stats import latency_ms, percentile, round_ratios, spread, summarise, targets  # noqa: E402


def test_percentile_is_nearest_rank() -> None:
    ordered = [float(i) for i in range(1, 101)]
    assert percentile(ordered, 50) == 50.0
    assert percentile(ordered, 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_latency_counts_only_records_that_arrived() -> None:
    figures = latency_ms([0.0, 1.0, 2.0], [0.010, None, 2.5])
    assert figures == {"p50_ms": 10.0, "p99_ms": 500.0, "max_ms": 500.0}
    assert latency_ms([0.0], [None]) == {}


def test_ratios_pair_contenders_of_the_same_round_only() -> None:
    saturated = {
        "raw": [{"round": 1, "records_per_s": 1000}, {"round": 2, "records_per_s": 800}],
        "conveyor_off": [{"round": 1, "records_per_s": 500}, {"round": 2, "lost": 3}],
        "quix": [{"round": 1, "records_per_s": 250}],
    }
    assert round_ratios(saturated) == [
        {"round": 1, "conveyor_vs_quix": 2.0, "conveyor_vs_raw": 0.5},
        {"round": 2},
    ]


def test_spread_skips_missing_figures() -> None:
    assert spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "rounds": 3}
    assert spread([None]) is None


def test_targets_say_met_missed_or_not_measured() -> None:
    rounds = {
        "conveyor_off": [{"round": 1, "records_per_s": 900, "cpu_us_per_record_per_hop": 40.0}],
        "raw": [{"round": 1, "records_per_s": 1000, "cpu_us_per_record_per_hop": 10.0}],
        "quix": [{"round": 1, "records_per_s": 1000, "cpu_us_per_record_per_hop": 30.0}],
    }
    results = {
        "saturated": rounds,
        "latency": {"200": {"conveyor_off": [{"round": 1, "p99_ms": 8.0}]}},
        "inference": [],
    }
    by_name = {t["target"]: t for t in targets(summarise(results, {}))}
    assert by_name["throughput >= 0.5x raw confluent-kafka"]["met"] is True
    assert by_name["throughput >= 1.0x Quix Streams"]["met"] is False
    assert by_name["runtime CPU beyond the raw loop <= 20 us/record/hop"]["measured_median"] == 30
    assert by_name["p99 <= 10 ms at 200/s"]["met"] is True
    assert by_name["p99 <= 25 ms at 1,000/s"]["met"] is None
    assert by_name["pipelined inference >= 0.9x the bare model"]["met"] is None
