"""The report of `bench/peers.py`: peers.json (every figure, the method, the machine) and peers.md.

peers.md is the short form: the contenders' table, same-round ratios, the targets, lost and
duplicated records, and, when other work crowded the machine, a warning saying so first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine import machine
from peer_model import MODEL_BATCH, MODEL_SECONDS
from peer_rig import QUIX
from peer_stats import spread, summarise, targets


def build_report(
    args: argparse.Namespace,
    results: dict[str, Any],
    integrity: dict[str, Any],
    spans: dict[str, int],
    load: tuple[float, ...],
) -> dict[str, Any]:
    summary = summarise(results, integrity)
    described = machine(load)
    if set(QUIX) & set(args.contenders):
        described.update(_quix_versions(args.bench_python))
    return {
        "benchmark": "peers",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "conditions": _conditions(args, results),
        "contenders": list(args.contenders),
        "machine": described,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "bench_python")}
        | {"model_batch": MODEL_BATCH, "model_seconds_per_batch": MODEL_SECONDS},
        "summary": summary,
        "targets": targets(summary),
        "spans_exported": spans,
        "load_average_per_round": results["load_average_per_round"],
        "cpu_per_round": results["cpu_per_round"],
        "rounds": {k: results[k] for k in ("saturated", "latency", "inference")},
        "method": METHOD,
    }


def _conditions(args: argparse.Namespace, results: dict[str, Any]) -> str:
    rounds = len(results["load_average_per_round"])
    loads = spread(results["load_average_per_round"], 2) or {}
    return (
        f"{rounds} interleaved rounds: {args.records:,} records per saturated measurement, "
        f"{args.latency_seconds:g} s per fixed-rate measurement at {args.rates} records/s, "
        f"{args.inference_records:,} records through the model stage; five hops, "
        f"{args.partitions} partitions, {os.cpu_count()} cores; 1-minute load average at round "
        f"start {loads.get('median')} [{loads.get('min')}–{loads.get('max')}]. Figures are "
        "medians [range] over rounds."
    )


def _quix_versions(python: str) -> dict[str, str]:
    code = (
        "import confluent_kafka, importlib.metadata as m; "
        "print(m.version('quixstreams'), m.version('confluent-kafka'), "
        "confluent_kafka.libversion()[0])"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    quix, client, lib = out.stdout.split()
    return {"quixstreams": quix, "quix_confluent_kafka": client, "quix_librdkafka": lib}


def write(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "peers.md").write_text(markdown(report))
    print(markdown(report))


# Other work above this share of the cores makes a run's figures the neighbours' as much as ours.
BUSY_SHARE = 0.25


def busy_machine(report: Mapping[str, Any]) -> str | None:
    """A warning when other work kept more than BUSY_SHARE of the cores busy; else None."""
    crowd = spread(r["other_cores"] for r in report["cpu_per_round"])
    cores = report["machine"]["cpu_count"] or 1
    if crowd is None or crowd["median"] <= BUSY_SHARE * cores:
        return None
    return (
        f"**Taken on a busy machine**: other work kept {crowd['median']} of {cores} cores busy "
        f"(median over rounds; load average {report['machine']['load_average_at_start'][0]} at "
        "start). Every contender was starved alike, so the same-round ratios and CPU per record "
        "say more than the absolute rates and latencies, which a quiet machine would improve; "
        "the targets' verdicts are not representative."
    )


def markdown(report: Mapping[str, Any]) -> str:
    """A short summary: the contenders' table, the ratios, the targets, the machine."""
    s = report["summary"]
    rates = sorted(s["latency"], key=int)
    head = ["contender", "records/s", "CPU µs/rec/hop"] + [f"p50 / p99 ms @{r}/s" for r in rates]
    warning = busy_machine(report)
    lines = [
        f"# Conveyor beside its Python peers ({report['date']})",
        "",
        *([warning, ""] if warning else []),
        report["conditions"],
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in report["contenders"]:
        cells = [
            name,
            _cell(s["records_per_s"].get(name)),
            _cell(s["cpu_us_per_record_per_hop"].get(name)),
        ]
        for rate in rates:
            figure = s["latency"][rate].get(name, {})
            cells.append(f"{_cell(figure.get('p50_ms'))} / {_cell(figure.get('p99_ms'))}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Same-round ratios (median [range]): "
        + ", ".join(f"{k} {_cell(v)}" for k, v in s["same_round_ratios"].items()),
    ]
    inference = s["pipelined_inference"]
    if inference["ratio"] is not None:
        lines += [
            "",
            f"Pipelined inference (50 ms per batch of 32): stage / bare model "
            f"{_cell(inference['ratio'])}; stage {_cell(inference['stage_records_per_s'])} "
            f"records/s, bare {_cell(inference['bare_model_records_per_s'])} records/s.",
        ]
    lines += ["", "| target | measured (median) | met |", "|---|---|---|"]
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured_median']} | {met} |")
    lines += [
        "",
        "Records lost / duplicated per contender: "
        + ", ".join(f"{n} {v['lost']}/{v['duplicates']}" for n, v in s["integrity"].items()),
    ]
    crowd = spread(r["other_cores"] for r in report["cpu_per_round"])
    lines += [
        "",
        f"Cores busy with other work than this benchmark during a round: {_cell(crowd)} "
        f"of {report['machine']['cpu_count']}.",
    ]
    m = report["machine"]
    lines += [
        "",
        f"Machine: {m['cpu_count']} cores, load average {m['load_average_at_start']} "
        f"at start, {m['load_average_at_end']} at end; Python {m['python']}, "
        f"librdkafka {m['librdkafka']} (Quix's: {m.get('quix_librdkafka')}).",
        "",
    ]
    return "\n".join(lines)


def _cell(figure: Mapping[str, Any] | None) -> str:
    if figure is None:
        return "—"
    if figure["rounds"] == 1 or figure["min"] == figure["max"]:
        return f"{figure['median']:,}"
    return f"{figure['median']:,} [{figure['min']:,}–{figure['max']:,}]"


METHOD = {
    "raw": "consume(500) of what is queued (blocking for one record only when idle, as the "
    "runtime polls) → produce each record unchanged → flush (acks) → async commit; Conveyor's "
    "librdkafka configuration (bench/hops.py run_raw_hop)",
    "quix": "Quix Streams Application, default at-least-once (commit every 5 s after the "
    "producer flushed), JSON deserializer and serializer (its defaults), to_topic; its own "
    "confluent-kafka (bench virtualenv)",
    "quix_avro": "(on request) as quix with Quix's AvroDeserializer/AvroSerializer "
    "(fastavro, schemaless) on the same Avro records Conveyor and raw get",
    "conveyor_off": "the real runtime (StageRunner), one relay stage per hop re-emitting a "
    "fixed event of the stage's output type; decode, routing, Avro encode, CloudEvents headers",
    "conveyor_sampled": "as conveyor_off with the OTel SDK, parentbased_traceidratio 0.1, "
    "OTLP/HTTP to a receiver in the bench process",
    "conveyor_on": "as conveyor_sampled with the always_on sampler",
    "saturated": "records written in one burst by the source process; records/s = records / "
    "(last arrival at the sink − first produce call); CPU = user+system time of the five hop "
    "processes over the measurement / (records × 5)",
    "latency": "source paced at the rate; per record, sink arrival − source produce call "
    "(wall clock, one machine)",
    "pipelined_inference": "an inference stage on the real runtime whose batch handler sleeps "
    "50 ms per batch of up to 32 (GIL released), tracing off, batch_max = "
    "--inference-batch-max, fed a burst of records; its sustained records/s (first record "
    "out → last record out) over the same model called back to back with no Kafka. "
    "stage_records_per_s_from_first_write includes the wait for the first fetch",
    "integrity": "every record keyed <tag>-<index>; the sink counts each key's arrivals over "
    "the whole run (and reads on at the end until its topics are quiet); a round's `late` "
    "counts records not through before its timeout (they may still arrive: integrity.lost "
    "is what never did)",
}
