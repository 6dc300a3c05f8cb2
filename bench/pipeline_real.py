"""Tracing overhead on the real pipeline: the five stage services with real models, off vs on.

bench/pipeline.py relays a fixed event through the runtime, the worst case for tracing's
relative cost; this one runs what users run. On one LocalBroker it starts a LocalStack per
configuration (the five services as processes with their real models: all-MiniLM-L6-v2 for embed
and classify, the moderation classifier; no SmolLM2, whose ~2 s per generate task on a CPU would
swamp the comparison), each with its own topic prefix, SQLite store, webhook receiver and
submitter: `untraced` (OTEL_SDK_DISABLED=true), `traced` (OTLP/HTTP to a receiver in this
process, parentbased_always_on, BatchSpanProcessor defaults but a 1 s schedule delay, see below)
and, with --sampled, `sampled` (parentbased_traceidratio 0.1; left out by default so the default
run affords more rounds).

The submitter is a `TaskClient` process with its stack's OTEL_* settings, as a traced gateway
would be: its root span makes the sampling decision that every stage follows (with its SDK off
it mints a sampled traceparent, so a ratio sampler in the stages alone would trace every task).

A round submits --tasks tasks (embed; one in ten classify; one in ten profane, which moderation
blocks) and is timed from the submit until every task's webhook arrived. Rounds interleave the
stacks, in a rotating order so drift on a shared machine hits them alike; one stack works while
the others idle (their consumers poll, cheaply). After each round every stack alike waits out
the span exporter's schedule delay + 1 s, so a traced round's last spans are exported, and
counted in its CPU, before the next round starts; the delay is set to 1 s (default 5 s) so that
wait is short and the budget affords many rounds (more, smaller exports: if anything more export
cost per span than the default).

Round-to-round noise is large on a shared 2-core machine (a neighbour's job, CPU steal, the
batching's dynamics): each figure is reported as the median over the rounds and as the median
and range of per-round-pair changes; `--control` runs the same with a second untraced stack in
place of the traced one, to show the noise floor. CPU per task (psutil, round start to settle
end) is given for each service, the broker, the submitter and this process; handler time per
task and mean batch size per service come from the services' /metrics, spans per task per
service from the receiver: they tell where a difference comes from.

The OTLP receiver runs in this process and would compete with the services for the CPU, where a
production collector runs on other machines: it keeps each request body on receipt and decodes
(counts) them after the round's timing (`OtlpReceiver(defer_decode=True)`).

Writes bench/results/pipeline_real.json (pipeline_real_control.json with --control) with the
machine and its load average (also per round: another job on a shared machine shows there).
Bounded: no round starts that the previous round's duration says would end after --budget
seconds; the defaults take about 4 minutes on 2 cores.

    python bench/pipeline_real.py [--tasks 300] [--rounds 10] [--budget 240] [--sampled]
    python bench/pipeline_real.py --control    # A/A: two untraced stacks, the noise floor
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_seconds, machine  # noqa: E402
from real_stacks import BSP_SCHEDULE_DELAY_MS, BenchStack, bench_stacks  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.local.otlp import OtlpReceiver  # noqa: E402
from conveyor.local.process import SERVICES  # noqa: E402
from conveyor.store import open_store  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_real.json"
# The BatchSpanProcessor exports at most its schedule delay after a span ends.
SETTLE_S = BSP_SCHEDULE_DELAY_MS / 1000 + 1.0


def settle(otlp: OtlpReceiver, since: float) -> None:
    """Wait out the exporters' schedule delay after `since`, then until no export for 1 s."""
    time.sleep(max(0.0, since + SETTLE_S - time.monotonic()))
    while time.monotonic() - otlp.last_request_at < 1.0:
        time.sleep(0.2)


def measure(
    stack: BenchStack, otlp: OtlpReceiver, broker_pid: int, tasks: list[Any]
) -> dict[str, Any]:
    """One timed round of `stack`; CPU from its start to the end of the settle."""
    pids = stack.pids()
    groups = {**{n: [p] for n, p in pids.items()}, "broker": [broker_pid], "bench": [os.getpid()]}
    stages0, spans0 = stack.stage_counters(), dict(otlp.span_count_by_service)
    before = {name: cpu_seconds(p) for name, p in groups.items()}
    seconds = stack.submit_and_wait(tasks, timeout_s=max(120.0, len(tasks) / 2))
    settle(otlp, time.monotonic())
    after = {name: cpu_seconds(p) for name, p in groups.items()}
    if stack.pids() != pids:
        raise RuntimeError(f"{stack.name}: a service restarted during the round")
    stages = {
        n: [b - a for a, b in zip(stages0[n], c, strict=True)]
        for n, c in stack.stage_counters().items()
    }
    spans = otlp.decode_pending()  # decoded now, outside the timing
    cpu_ms = {name: (after[name] - before[name]) / len(tasks) * 1e3 for name in groups}
    return {
        "tasks": len(tasks),
        "seconds": round(seconds, 3),
        "tasks_per_s": round(len(tasks) / seconds, 1),
        "cpu_ms_per_task": {k: round(v, 2) for k, v in cpu_ms.items()},
        "services_cpu_ms_per_task": round(sum(cpu_ms[n] for n in SERVICES), 2),
        "handler_ms_per_task": {n: round(c[2] / len(tasks) * 1e3, 2) for n, c in stages.items()},
        "mean_batch": {n: round(c[1] / max(c[0], 1), 1) for n, c in stages.items()},
        "spans": spans,
        "spans_by_service": {
            s: n - spans0.get(s, 0)
            for s, n in otlp.span_count_by_service.items()
            if n > spans0.get(s, 0)
        },
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def run_rounds(
    stacks: list[BenchStack], otlp: OtlpReceiver, broker_pid: int, args: argparse.Namespace
) -> None:
    for stack in stacks:  # model warm-up, group joins, connections, store files
        stack.submit_and_wait(stack.batch(args.warmup, "warm"), timeout_s=300)
    settle(otlp, time.monotonic())
    otlp.decode_pending()
    last_s = 0.0
    for n in range(args.rounds):
        began = time.monotonic()
        if began + last_s > args.deadline:
            break  # keep the run bounded: fewer rounds on a slow or busy machine
        order = stacks[n % len(stacks) :] + stacks[: n % len(stacks)]
        for stack in order:
            figures = measure(stack, otlp, broker_pid, stack.batch(args.tasks, f"r{n}"))
            stack.rounds.append(figures)
            print(
                f"round {n + 1} {stack.name}: {figures['tasks_per_s']} tasks/s, "
                f"{figures['services_cpu_ms_per_task']} ms service CPU/task, "
                f"{figures['spans']} spans",
                file=sys.stderr,
            )
        last_s = time.monotonic() - began


def check_store(stack: BenchStack) -> dict[str, int]:
    """Every task submitted ended once in the store with the status expected of it."""
    store = open_store(stack.env["CONVEYOR_STORE_URL"])
    try:
        counts = store.count_by_status()
    finally:
        store.close()
    want = {s: list(stack.expect.values()).count(s) for s in set(stack.expect.values())}
    got = {s: c for s, c in counts.items() if c}
    if got != want:
        raise RuntimeError(f"{stack.name}: store counts {got}, expected {want}")
    return got


def summarise(
    stacks: list[BenchStack], args: argparse.Namespace, started: dict[str, Any]
) -> dict[str, Any]:
    rounds = min(len(s.rounds) for s in stacks)
    by = {s.name: s.rounds[:rounds] for s in stacks}
    tasks = rounds * args.tasks
    return {
        "benchmark": "pipeline_real",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(started["load"], packages=("torch", "transformers")),
        "stacks": list(by),
        "tasks_per_round": args.tasks,
        "warmup_tasks": args.warmup,
        "rounds": rounds,
        "startup_seconds": started["startup_s"],
        "throughput": compare(by, "tasks_per_s"),
        "services_cpu_ms_per_task": compare(by, "services_cpu_ms_per_task"),
        "cpu_ms_per_task_by_process": {n: medians(rs, "cpu_ms_per_task") for n, rs in by.items()},
        "handler_ms_per_task": {n: medians(rs, "handler_ms_per_task") for n, rs in by.items()},
        "mean_batch": {n: medians(rs, "mean_batch") for n, rs in by.items()},
        "spans_per_task": {
            n: round(sum(r["spans"] for r in rs) / tasks, 2) for n, rs in by.items()
        },
        "spans_per_task_by_service": {
            n: {s: round(c / tasks, 2) for s, c in totals(rs, "spans_by_service").items()}
            for n, rs in by.items()
        },
        "store_counts": started["store_counts"],
        "all_rounds": by,
        "method": [" ".join(part.split()) for part in __doc__.split("\n\n")[1:-1]],
    }


def compare(by: dict[str, list[dict[str, Any]]], key: str) -> dict[str, Any]:
    """Each stack's median of `key` over the rounds, and each one's change against `untraced`:
    of the medians, and the median and range of the per-round-pair changes (robust to drift)."""
    median = {n: statistics.median(r[key] for r in rs) for n, rs in by.items()}
    pairs = {
        n: [t[key] / u[key] - 1 for t, u in zip(rs, by["untraced"], strict=True)]
        for n, rs in by.items()
        if n != "untraced"
    }
    return {
        "median": {n: round(v, 2) for n, v in median.items()},
        "change_vs_untraced": {n: round(median[n] / median["untraced"] - 1, 3) for n in pairs},
        "paired_change_median": {n: round(statistics.median(v), 3) for n, v in pairs.items()},
        "paired_change_range": {n: [round(min(v), 3), round(max(v), 3)] for n, v in pairs.items()},
    }


def medians(rounds: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per name, the median over the rounds of `round[key][name]`."""
    names = sorted({name for r in rounds for name in r[key]})
    return {n: round(statistics.median(r[key].get(n, 0) for r in rounds), 2) for n in names}


def totals(rounds: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Per name, the sum over the rounds of `round[key][name]`."""
    out: dict[str, float] = {}
    for r in rounds:
        for name, value in r[key].items():
            out[name] = out.get(name, 0) + value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks per round per stack")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=60, help="tasks per stack before timing")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; no round after")
    parser.add_argument(
        "--sampled", action="store_true", help="add a parentbased_traceidratio 0.1 stack"
    )
    parser.add_argument(
        "--control", action="store_true", help="A/A: a second untraced stack instead of traced"
    )
    args = parser.parse_args()
    began = time.monotonic()
    args.deadline = began + args.budget
    started: dict[str, Any] = {"load": os.getloadavg()}  # what the summary needs of the run
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-real-"))
    run = uuid.uuid4().hex[:6]
    with LocalBroker() as broker, OtlpReceiver(keep_spans=False, defer_decode=True) as otlp:
        assert broker.pid is not None
        stacks = bench_stacks(
            broker.bootstrap,
            otlp.endpoint,
            run,
            root,
            sampled=args.sampled,
            control=args.control,
        )
        try:
            with ThreadPoolExecutor(len(stacks)) as pool:
                list(pool.map(BenchStack.start, stacks))  # model loads overlap on I/O
            started["startup_s"] = round(time.monotonic() - began, 1)
            run_rounds(stacks, otlp, broker.pid, args)
            started["store_counts"] = {s.name: check_store(s) for s in stacks}
        except BaseException:
            print(f"service logs kept in {root}", file=sys.stderr)
            raise
        finally:
            with ThreadPoolExecutor(len(stacks)) as pool:
                list(pool.map(BenchStack.stop, stacks))
    report = summarise(stacks, args, started)
    report["total_seconds"] = round(time.monotonic() - began, 1)
    out = RESULTS.with_name("pipeline_real_control.json") if args.control else RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "all_rounds"}, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
