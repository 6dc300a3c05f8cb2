"""The peer benchmark (bench/peers.py) still runs end to end and loses nothing.

A smoke run on the session's broker: every contender (raw confluent-kafka, Quix Streams from the
bench virtualenv with its default JSON and with Avro, Conveyor with tracing off, sampled and
always-on) and the pipelined-inference stage, a few hundred records, one round. It asserts that
every record went through every contender exactly once and that each kind of figure was
produced, never how fast: speed on a shared machine is what the benchmark reports, not what a
test can hold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
CONTENDERS = ("raw", "quix", "quix_avro", "conveyor_off", "conveyor_sampled", "conveyor_on")
RECORDS, WARMUP, RATE, SECONDS, INFERENCE = 300, 50, 200, 1, 96
# 32 processes start and join their groups on a busy 2-core machine: minutes, not seconds.
pytestmark = pytest.mark.timeout(900)


def test_peer_benchmark_passes_every_record_once_through_every_contender(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    if not BENCH_PYTHON.exists():
        pytest.skip("no .venv-bench for the Quix Streams hops: `make bench-venv` installs it")
    argv = [
        sys.executable, str(ROOT / "bench" / "peers.py"),
        "--bootstrap", kafka_bootstrap,
        "--records", str(RECORDS), "--warmup", str(WARMUP), "--rounds", "1",
        "--rates", str(RATE), "--latency-seconds", str(SECONDS),
        "--inference-records", str(INFERENCE), "--partitions", "3",
        "--contenders", ",".join(CONTENDERS),
        "--bench-python", str(BENCH_PYTHON), "--output", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(argv, env=os.environ, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "peers.json").read_text())
    summary = report["summary"]

    per_contender = WARMUP + RECORDS + RATE * SECONDS
    for name in CONTENDERS:
        assert summary["integrity"][name] == {
            "written": per_contender,
            "arrived": per_contender,
            "lost": 0,
            "duplicates": 0,
        }, name
        assert summary["records_per_s"][name]["rounds"] == 1, name
        assert summary["cpu_us_per_record_per_hop"][name]["median"] > 0, name
        assert summary["latency"][str(RATE)][name]["p99_ms"]["rounds"] == 1, name
    model = summary["integrity"]["model_stage"]
    assert (model["lost"], model["duplicates"]) == (0, 0)
    assert model["written"] == WARMUP + INFERENCE
    assert summary["pipelined_inference"]["ratio"]["rounds"] == 1
    assert set(summary["same_round_ratios"]) == {
        "conveyor_vs_quix", "conveyor_vs_quix_avro", "conveyor_vs_raw", "sampled_vs_off",
        "always_on_vs_off",
    }  # fmt: skip
    assert all(r is not None for r in summary["same_round_ratios"].values())
    # Tracing was on where it should be: always-on exports a span per record per hop.
    assert report["spans_exported"]["conveyor_on"] >= 5 * per_contender
    assert (tmp_path / "peers.md").read_text().startswith("# Conveyor beside its Python peers")
