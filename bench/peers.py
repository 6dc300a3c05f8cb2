"""Conveyor beside its Python peers: raw confluent-kafka, Quix Streams, Conveyor (3 tracing modes).

One run, one broker (a `LocalBroker` of its own unless `--bootstrap`), one topology: five hops,
each its own process, topic i → i+1 with `--partitions` partitions, a no-op handler and the same
~330-byte task event (CloudEvents headers + Avro task data; Quix gets the task data as JSON, its
default serializer) written by a separate source process and read by a separate sink process.
Contenders: `raw` (consume up to 500 → produce → flush → commit, bench/hops.py), `quix` (Quix
Streams, default at-least-once, bench/quix_hop.py, run from the bench virtualenv), Conveyor's real
runtime with relay stages and tracing off, 10% parent-based sampling, always-on.

Each round, contenders in a rotated order: a saturated measurement (`--records` written in one
burst; records/s from the first write to the last arrival, CPU µs per record per hop from the
five hop processes' CPU times), then at each `--rates` a fixed-rate measurement of
`--latency-seconds` (p50/p99 from the source's produce call to the sink's arrival), then the
pipelined-inference pair (bench/peer_model.py). Same-round ratios, medians and spreads, the
issue 8 targets, whether any record was lost or duplicated, and the machine's load go to
bench/results/peers.json and peers.md. No round starts after `--budget` seconds.

    python bench/peers.py                                  # the full comparison (make bench)
    python bench/peers.py --records 2000 --rounds 1 --rates 200 --latency-seconds 2  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import CpuProbe, cpu_seconds  # noqa: E402
from peer_io import Collect, SourceJob  # noqa: E402
from peer_model import MODEL_BATCH, bare_model_rate  # noqa: E402
from peer_report import build_report, busy_machine, write  # noqa: E402
from peer_rig import CONTENDERS, OPTIONAL, QUIX, Chain, Options, Rig, running  # noqa: E402
from peer_stats import latency_ms  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.local.otlp import OtlpReceiver  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCH_PYTHON = HERE.parent / ".venv-bench" / "bin" / "python"
WARMUP_TIMEOUT_S = 300.0  # group joins of 26 fresh consumers on a busy 2-core machine
DRAIN_TIMEOUT_S = 60.0  # after a paced round's last write: a contender far behind still ends


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--records", type=int, default=20_000, help="per saturated measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rates", default="200,1000", help="records/s of the latency rounds; '' none")
    p.add_argument("--latency-seconds", type=float, default=5.0)
    p.add_argument("--inference-records", type=int, default=3_200, help="0 skips the scenario")
    p.add_argument("--inference-batch-max", type=int, default=MODEL_BATCH)
    p.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated; also known: {', '.join(OPTIONAL)}",
    )
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--warmup", type=int, default=500, help="records per contender before timing")
    p.add_argument("--round-timeout", type=float, default=300.0, help="seconds per measurement")
    p.add_argument("--budget", type=float, default=480.0, help="seconds; no round starts after")
    p.add_argument("--bootstrap", help="an existing broker; default: start a LocalBroker")
    p.add_argument("--bench-python", default=os.environ.get("BENCH_PYTHON", str(BENCH_PYTHON)))
    p.add_argument("--output", type=Path, default=HERE / "results", help="folder for peers.*")
    args = p.parse_args(argv)
    args.contenders = tuple(c for c in args.contenders.split(",") if c)
    unknown = set(args.contenders) - set(CONTENDERS + OPTIONAL)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS + OPTIONAL)}")
    args.rates = [int(r) for r in args.rates.split(",") if r]
    if set(QUIX) & set(args.contenders) and not Path(args.bench_python).exists():
        p.error(f"{args.bench_python} missing: `make bench-venv` installs Quix Streams there")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    began = time.monotonic()
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        broker = None if args.bootstrap else stack.enter_context(LocalBroker())
        bootstrap = broker.bootstrap if broker is not None else args.bootstrap
        broker_pids = [broker.pid] if broker is not None and broker.pid else []
        receivers = {
            name: stack.enter_context(OtlpReceiver(keep_spans=False, defer_decode=True))
            for name in ("conveyor_sampled", "conveyor_on")
            if name in args.contenders
        }
        opts = Options(
            bootstrap,
            args.contenders,
            args.partitions,
            args.bench_python,
            {name: r.endpoint for name, r in receivers.items()},
            args.inference_batch_max if args.inference_records else 0,
        )
        with running(opts) as rig:
            results, jobs = measure_all(rig, args, began, broker_pids)
            seen = _finish(rig)
        spans = _span_counts(receivers)
    report = build_report(args, results, _integrity(jobs, seen), spans, load)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    report["busy_machine"] = busy_machine(report)
    write(report, args.output)
    return report


def measure_all(
    rig: Rig, args: argparse.Namespace, began: float, extra_pids: list[int]
) -> tuple[dict[str, Any], list[tuple[str, str, int]]]:
    """Warm-up, then the interleaved rounds; returns the rows and every job (chain, tag, n)."""
    jobs: list[tuple[str, str, int]] = []
    results: dict[str, Any] = {
        "saturated": {name: [] for name in rig.chains},
        "latency": {str(rate): {name: [] for name in rig.chains} for rate in args.rates},
        "inference": [],
        "load_average_per_round": [],
        "cpu_per_round": [],
    }
    chains = list(rig.chains.values()) + ([rig.model] if rig.model else [])
    for chain in chains:
        row = _saturated(rig, chain, "w", args.warmup, WARMUP_TIMEOUT_S, jobs)
        if row["late"]:
            raise RuntimeError(f"{chain.name}: warm-up incomplete ({row['late']} not through)")
        _say(f"warm {chain.name}: {row['records_per_s']:,.0f} records/s")
    for n in range(1, args.rounds + 1):
        if n > 1 and time.monotonic() - began > args.budget:
            _say(f"budget of {args.budget:.0f} s spent: {n - 1} rounds")
            break
        results["load_average_per_round"].append(round(os.getloadavg()[0], 2))
        probe = CpuProbe(rig.pids + [os.getpid()] + extra_pids)
        one_round(rig, args, n, results, jobs)
        results["cpu_per_round"].append({"round": n, **probe.cores()})
    return results, jobs


def one_round(
    rig: Rig, args: argparse.Namespace, n: int, results: dict[str, Any], jobs: list[Any]
) -> None:
    names = list(rig.chains)
    k = (n - 1) % max(len(names), 1)
    order = [rig.chains[name] for name in names[k:] + names[:k]]
    for chain in order:
        row = _saturated(rig, chain, f"s{n}", args.records, args.round_timeout, jobs)
        results["saturated"][chain.name].append({"round": n, **row})
        _say(f"round {n} {chain.name}: {row}")
    for rate in args.rates:
        for chain in order:
            row = _paced(rig, chain, f"l{rate}r{n}", rate, args, jobs)
            results["latency"][str(rate)][chain.name].append({"round": n, **row})
            _say(f"round {n} {chain.name} @{rate}/s: {row}")
    if rig.model is not None:
        row = _inference(rig, rig.model, n, args.inference_records, args.round_timeout, jobs)
        results["inference"].append({"round": n, **row})
        _say(f"round {n} pipelined inference: {row}")


def _saturated(
    rig: Rig, chain: Chain, label: str, n: int, timeout_s: float, jobs: list[Any]
) -> dict[str, Any]:
    """Burst `n` records; records/s first write → last arrival, CPU µs per record per hop."""
    cpu = [0.0]
    sent, arrived = _exchange(rig, chain, label, n, 0.0, timeout_s, jobs, cpu)
    cpu_us = cpu[0] / (n * len(chain.pids)) * 1e6
    got = [a for a in arrived if a is not None]
    row: dict[str, Any] = {"late": n - len(got), "source_write_s": round(sent[-1] - sent[0], 3)}
    if not row["late"]:
        row["records_per_s"] = round(n / max(max(got) - sent[0], 1e-3))
        row["cpu_us_per_record_per_hop"] = round(cpu_us, 1)
    return row


def _paced(
    rig: Rig, chain: Chain, label: str, rate: int, args: argparse.Namespace, jobs: list[Any]
) -> dict[str, Any]:
    n = max(1, round(rate * args.latency_seconds))
    timeout_s = args.latency_seconds + DRAIN_TIMEOUT_S
    sent, arrived = _exchange(rig, chain, label, n, float(rate), timeout_s, jobs)
    got = sum(a is not None for a in arrived)
    offered = (n - 1) / max(sent[-1] - sent[0], 1e-3) if n > 1 else float(rate)
    return {"late": n - got, "offered_per_s": round(offered), **latency_ms(sent, arrived)}


def _inference(
    rig: Rig, chain: Chain, n: int, records: int, timeout_s: float, jobs: list[Any]
) -> dict[str, Any]:
    """The model stage on a burst of `records`, then the bare model on as many.

    The ratio takes the stage's sustained rate, from the first record out to the last: the
    wait for the very first fetch is start-up, not throughput, and the bare loop has none.
    """
    assert chain.counters is not None
    calls, handled = (c.value for c in chain.counters)
    sent, arrived = _exchange(rig, chain, f"i{n}", records, 0.0, timeout_s, jobs)
    calls, handled = chain.counters[0].value - calls, chain.counters[1].value - handled
    bare = bare_model_rate(records)
    got = sorted(a for a in arrived if a is not None)
    row: dict[str, Any] = {
        "late": records - len(got),
        "mean_batch_handed_to_model": round(handled / calls, 1) if calls else None,
        "bare_model_records_per_s": round(bare, 1),
    }
    if row["late"] or got[-1] <= got[0]:
        return row | {"ratio": None}
    first_out = sum(a == got[0] for a in got)  # the sink stamps a whole read at once
    sustained = (records - first_out) / (got[-1] - got[0])
    return row | {
        "first_write_to_first_out_ms": round((got[0] - sent[0]) * 1e3),
        "stage_records_per_s_from_first_write": round(records / (got[-1] - sent[0])),
        "stage_records_per_s": round(sustained),
        "ratio": round(sustained / bare, 3),
    }


def _exchange(
    rig: Rig,
    chain: Chain,
    label: str,
    n: int,
    rate: float,
    timeout_s: float,
    jobs: list[Any],
    cpu: list[float] | None = None,
) -> tuple[list[float], list[float | None]]:
    """One measurement: the source writes, the sink times; `cpu[0]` gets the hops' CPU seconds."""
    tag = f"{chain.short}-{label}"
    _check_running(chain)
    jobs.append((chain.name, tag, n))
    rig.source.send(SourceJob(chain.source, tag, n, chain.form, rate))
    if rig.source.recv() != "built":
        raise RuntimeError("source did not build its records")
    rig.sink.send(Collect(tag, n, timeout_s))
    cpu0 = cpu_seconds(chain.pids)
    rig.source.send("go")
    sent: list[float] = rig.source.recv()
    arrived: list[float | None] = rig.sink.recv()
    if cpu is not None:
        cpu[0] = cpu_seconds(chain.pids) - cpu0
    return sent, arrived


def _check_running(chain: Chain) -> None:
    """A dead hop would only show as a timeout minutes later: say which one now."""
    for pid in chain.pids:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError(f"{chain.name}: hop process {pid} is gone")


def _finish(rig: Rig) -> dict[str, int]:
    rig.source.send(None)
    rig.sink.send(None)
    seen: dict[str, int] = rig.sink.recv()
    return seen


def _span_counts(receivers: dict[str, OtlpReceiver]) -> dict[str, int]:
    """Spans each traced contender exported (decoded now: decoding on receipt costs CPU)."""
    for receiver in receivers.values():
        receiver.decode_pending()
    return {name: r.span_count for name, r in receivers.items()}


def _integrity(jobs: list[tuple[str, str, int]], seen: dict[str, int]) -> dict[str, Any]:
    """Per chain: records written, distinct ones that arrived, lost, duplicates (whole run)."""
    out: dict[str, dict[str, int]] = {}
    for name, tag, n in jobs:
        counts = [seen.get(f"{tag}-{i}", 0) for i in range(n)]
        row = out.setdefault(name, {"written": 0, "arrived": 0, "lost": 0, "duplicates": 0})
        row["written"] += n
        row["arrived"] += sum(c > 0 for c in counts)
        row["lost"] += sum(c == 0 for c in counts)
        row["duplicates"] += sum(c - 1 for c in counts if c > 1)
    return out


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
