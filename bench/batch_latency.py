"""A 20,000-task embed batch through the real pipeline, and interactive latency while it runs.

Issue 12's "Batch" must-show: a large embed batch completes with correct counts and every result
in input order, and interactive tasks submitted during it keep their latency. On one LocalBroker
this starts a LocalStack with the gateway (every service a process, the real models, a SQLite
store), then:

1. **idle**: `--interactive` embed tasks through `POST /v1/tasks` (lane `normal`), one every
   `--gap-s`, with nothing else running;
2. **batch**: `POST /v1/batches` with `--tasks` embed lines (lane `low` by default), and while it
   runs the same interactive tasks again, one every `--gap-s`, until the batch ends;
3. the results file is streamed and checked: one line per input line, in input order, every one
   `completed` with a 384-d embedding.

An interactive task's latency is from its reservation at the gateway (`created_at`) to its
terminal event (`completed_at`, moderation's event time): both wall-clock times on this machine,
read from the store, so polling adds nothing to them. Reported: p50/p95/max per phase, the batch's
submit time (check + store + publish of the whole file), its duration and throughput, and its
counts, with the gateway's dispatch window (`batch_in_flight`, docs/batches.md "Paced dispatch")
it ran under. Written to bench/results/batches.json (or `--out`).

`--window N` sets that window (default: the gateway's default; 0 = no bound, every task
published at once as before pacing); `--windows 0,512` runs the whole sequence once per window,
each on a fresh stack and store against the same broker, to compare them in the same conditions.

    python bench/batch_latency.py [--tasks 20000] [--interactive 40] [--gap-s 0.5] [--budget 1800]
                                  [--window N | --windows N,M] [--out FILE]
                                  [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.local.stack import LocalStack  # noqa: E402
from conveyor.net import free_ports  # noqa: E402
from conveyor.services.gateway.settings import GatewaySettings  # noqa: E402
from conveyor.store import open_store  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "batches.json"
TOKEN = "tok-bench"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TERMINAL = {"completed", "blocked", "failed", "expired", "cancelled"}


def start_stack(bootstrap: str, root: Path, window: int) -> tuple[LocalStack, str, str]:
    root.mkdir(parents=True, exist_ok=True)
    store_url = f"sqlite:///{root / 'conveyor.db'}"
    (port,) = free_ports(1)
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
        "CONVEYOR_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:6]}.",
        "CONVEYOR_STORE_URL": store_url,
        "CONVEYOR_GATEWAY_TOKENS": json.dumps({TOKEN: "bench"}),
        "CONVEYOR_GATEWAY_PORT": str(port),
        "CONVEYOR_PUBLISH_TIMEOUT_S": "60",
        "CONVEYOR_BATCH_IN_FLIGHT": str(window),
        "OTEL_SDK_DISABLED": "true",
    }
    services = ("writeback", "notify", "moderation", "inference", "preprocess", "gateway")
    stack = LocalStack(root, env, services=services)
    stack.apply_topics()
    stack.start()
    return stack, f"http://127.0.0.1:{port}", store_url


def interactive(http: httpx.Client, tag: str, n: int) -> str:
    body = {"kind": "embed", "input": f"interactive {tag} request number {n}"}
    answer = http.post("/v1/tasks", json=body)
    answer.raise_for_status()
    task_id: str = answer.json()["task_id"]
    return task_id


def latencies(store_url: str, tenant: str, task_ids: list[str], timeout_s: float) -> list[float]:
    """Seconds from reservation to terminal event of each task, once all ended."""
    store = open_store(store_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = [store.get(t, tenant=tenant) for t in task_ids]
            if all(r is not None and r.status in TERMINAL for r in records):
                return [
                    (r.completed_at - r.created_at).total_seconds()
                    for r in records
                    if r is not None and r.completed_at is not None
                ]
            time.sleep(0.5)
        raise SystemExit(f"interactive tasks did not end within {timeout_s}s")
    finally:
        store.close()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "max_s": round(ordered[-1], 3),
        "mean_s": round(statistics.fmean(ordered), 3),
    }


def warm_up(http: httpx.Client, store_url: str) -> None:
    """Until a few tasks go through: consumer groups joined, models and caches warm."""
    for round_ in range(5):
        ids = [interactive(http, f"warm{round_}", n) for n in range(5)]
        if max(latencies(store_url, "bench", ids, timeout_s=300)) < 2.0:
            return


def idle_phase(http: httpx.Client, args: argparse.Namespace, store_url: str) -> dict[str, Any]:
    warm_up(http, store_url)
    ids = []
    for n in range(args.interactive):
        ids.append(interactive(http, "idle", n))
        time.sleep(args.gap_s)
    return summary(latencies(store_url, "bench", ids, timeout_s=300))


def batch_phase(http: httpx.Client, args: argparse.Namespace, store_url: str) -> dict[str, Any]:
    lines = [
        json.dumps({"custom_id": f"doc-{i}", "body": {"kind": "embed", "input": f"doc {i} text"}})
        for i in range(args.tasks)
    ]
    started = time.monotonic()
    answer = http.post(
        "/v1/batches",
        content="\n".join(lines).encode(),
        headers={"Content-Type": "application/jsonl"},
        timeout=600,
    )
    if answer.status_code != 202:
        raise SystemExit(f"batch refused: {answer.status_code} {answer.text[:500]}")
    submitted = time.monotonic()
    batch_id = answer.json()["id"]
    ids: list[str] = []
    batch: dict[str, Any] = answer.json()
    deadline = started + args.budget
    n = 0
    while batch["status"] not in TERMINAL | {"completed"} and time.monotonic() < deadline:
        if n < args.interactive * 50:  # at most this many during one batch
            ids.append(interactive(http, "batch", n))
            n += 1
        time.sleep(args.gap_s)
        batch = http.get(f"/v1/batches/{batch_id}").json()
    ended = time.monotonic()
    # Past the budget the figures so far are still reported, marked incomplete.
    return {
        "completed_within_budget": batch["status"] == "completed",
        "batch_id": batch_id,
        "tasks": args.tasks,
        "submit_s": round(submitted - started, 1),
        "duration_s": round(ended - started, 1),
        "tasks_per_s": round(args.tasks / (ended - started), 1),
        "request_counts": batch["request_counts"],
        "results": check_results(http, batch_id, args.tasks)
        if batch["status"] == "completed"
        else None,
        "interactive": summary(latencies(store_url, "bench", ids, timeout_s=300)),
        # Interactive latency over time: without pacing (window 0) the first tasks after the
        # submit wait behind the whole batch's records at every stage without lanes.
        "interactive_first_10_s": [
            round(v, 1) for v in latencies(store_url, "bench", ids[:10], timeout_s=300)
        ],
    }


def check_results(http: httpx.Client, batch_id: str, total: int) -> dict[str, Any]:
    seen = 0
    in_order = True
    completed = 0
    with http.stream("GET", f"/v1/batches/{batch_id}/results", timeout=600) as answer:
        for raw in answer.iter_lines():
            if not raw:
                continue
            line = json.loads(raw)
            in_order &= line["custom_id"] == f"doc-{seen}"
            emb = (line.get("response") or {}).get("body", {}).get("result", {}).get("embedding")
            completed += line["status"] == "completed" and emb is not None and len(emb) == 384
            seen += 1
    return {"lines": seen, "in_input_order": in_order and seen == total, "completed": completed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--interactive", type=int, default=40)
    parser.add_argument("--gap-s", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=1800.0, help="batch phase limit, s")
    default_window = GatewaySettings.model_fields["batch_in_flight"].default
    parser.add_argument(
        "--window", type=int, default=default_window, help="batch_in_flight; 0: no bound"
    )
    parser.add_argument("--windows", help="compare: one run per window, e.g. 0,512")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP"),
        help="an existing broker (default: start a LocalBroker)",
    )
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")] if args.windows else [args.window]
    # SIGTERM unwinds like Ctrl-C, so the services this run started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-batches-"))
    load_before = os.getloadavg()
    runs = []
    with contextlib.ExitStack() as resources:
        bootstrap = args.bootstrap
        if not bootstrap:
            bootstrap = resources.enter_context(LocalBroker()).bootstrap
        for window in windows:
            runs.append(run(args, bootstrap, root / f"window-{window}", window))
    report: dict[str, Any] = {"machine": machine(load_before), "load_after": os.getloadavg()}
    report |= runs[0] if len(runs) == 1 else {"runs": runs}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def run(args: argparse.Namespace, bootstrap: str, root: Path, window: int) -> dict[str, Any]:
    """Idle, then batch, on a fresh stack whose gateway paces batches with `window`."""
    stack, url, store_url = start_stack(bootstrap, root, window)
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            load = os.getloadavg()
            idle = idle_phase(http, args, store_url)
            print(f"window={window} idle interactive latency: {idle}", flush=True)
            during = batch_phase(http, args, store_url)
            print(f"window={window} batch: {during}", flush=True)
    finally:
        stack.stop()
    return {
        "batch_in_flight": window,
        "load_at_start": load,
        "load_at_end": os.getloadavg(),
        "idle_interactive": idle,
        "batch": during,
    }


if __name__ == "__main__":
    sys.exit(main())
