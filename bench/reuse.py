"""Result reuse at the issue's scale: 1,000 tasks of which 500 repeat earlier inputs.

On a LocalBroker, a LocalStack (the five services as processes, real models: all-MiniLM-L6-v2
for embed and classify, the moderation classifier; SQLite store; CONVEYOR_REUSE=true) takes
--tasks tasks: half distinct (embed, one in ten classify; two tenants), half repeats of an
earlier one (same tenant, kind and input; every other repeat spelled with extra whitespace, which
normalisation removes), repeats after their originals in submit order. It counts the model's runs
from inference's `conveyor_model_records_total` and the lookups by outcome, checks that every task
completed with its original's result (repeats) and that distinct inputs got distinct results,
and times submit to the last stored task. With --compare the same tasks run on a second stack
with reuse off, for the wall time and the model runs saved.

Writes bench/results/reuse.json.

    python bench/reuse.py [--tasks 1000] [--compare]    # CONVEYOR_KAFKA_BOOTSTRAP: own broker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.client import TaskClient  # noqa: E402
from conveyor.local.samples import MINILM_ONLY, SENTENCES  # noqa: E402
from conveyor.local.stack import LocalStack  # noqa: E402
from conveyor.settings import KafkaSettings  # noqa: E402
from conveyor.store import open_store  # noqa: E402
from tests.e2e.observability import samples  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "reuse.json"
LABELS = ["business", "weather", "culture", "infrastructure"]


def workload(n: int, run: str) -> list[dict[str, Any]]:
    """n tasks: n/2 distinct, then each repeated once (after its original)."""
    half = n // 2
    first: list[dict[str, Any]] = []
    for i in range(half):
        task: dict[str, Any] = {
            "task_id": f"{run}-o{i:05d}",
            "tenant": ("acme", "globex")[i % 2],
            "kind": "classify" if i % 10 == 9 else "embed",
            "input": f"{SENTENCES[i % len(SENTENCES)]} Item {i}.",
        }
        if task["kind"] == "classify":
            task["labels"] = LABELS
        first.append(task)
    again = []
    for i, task in enumerate(first):
        repeat = {**task, "task_id": f"{run}-r{i:05d}"}
        if i % 2:
            repeat["input"] = "  " + task["input"].replace(" ", "   ") + "\n"
        again.append(repeat)
    return first + again


def run_stack(
    bootstrap: str, workdir: Path, tasks: list[dict[str, Any]], *, reuse: bool
) -> dict[str, Any]:
    prefix = f"bench{'on' if reuse else 'off'}{int(time.time())}."
    url = f"sqlite:///{workdir / 'conveyor.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
        "CONVEYOR_TOPIC_PREFIX": prefix,
        "CONVEYOR_STORE_URL": url,
        "CONVEYOR_REUSE": "true" if reuse else "false",
        "CONVEYOR_MODELS": MINILM_ONLY,
        "CONVEYOR_RETRY_DELAYS": "[1, 2, 4]",
        "OTEL_SDK_DISABLED": "true",
    }
    stack = LocalStack(workdir, env)
    stack.apply_topics()
    stack.start()
    try:
        client = TaskClient(
            KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix),
            source="/bench/reuse",
        )
        started = time.monotonic()
        client.submit_many(tasks)
        store = open_store(url)
        deadline = started + max(600.0, len(tasks))
        while sum(store.count_by_status()[s] for s in ("completed", "blocked", "failed")) < len(
            tasks
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done: {store.count_by_status()}")
            stack.supervise()
            time.sleep(0.2)
        seconds = time.monotonic() - started
        results = {t["task_id"]: store.get(t["task_id"], tenant=t["tenant"]) for t in tasks}
        store.close()
        metrics = stack.procs["inference"].metrics()
    finally:
        stack.stop()
    outcomes = {
        o: sum(samples(metrics, "conveyor_reuse_lookups_total", outcome=o))
        for o in ("hit", "coalesced", "wait", "miss", "bypass")
    }
    return {
        "reuse": reuse,
        "tasks": len(tasks),
        "seconds": round(seconds, 2),
        "tasks_per_s": round(len(tasks) / seconds, 1),
        "model_runs": sum(samples(metrics, "conveyor_model_records_total")),
        "lookups": outcomes,
        "check": check(tasks, results),
    }


def check(tasks: list[dict[str, Any]], results: Mapping[str, Any]) -> dict[str, Any]:
    """Every task completed; each repeat has its original's result; distinct inputs differ."""
    half = len(tasks) // 2
    bad = [
        t["task_id"]
        for t in tasks
        if (r := results[t["task_id"]]) is None or r.status != "completed"
    ]
    mismatched = [
        t["task_id"]
        for o, t in zip(tasks[:half], tasks[half:], strict=True)
        if not bad and results[o["task_id"]].result != results[t["task_id"]].result
    ]
    distinct = (
        len({json.dumps(results[t["task_id"]].result) for t in tasks[:half]}) if not bad else 0
    )
    ok = not bad and not mismatched and distinct == half
    if not ok:
        raise RuntimeError(f"wrong results: {len(bad)} not completed, {len(mismatched)} differ")
    return {"completed": len(tasks), "repeats_equal_originals": half, "distinct_results": distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--compare", action="store_true", help="also run with reuse off")
    args = parser.parse_args()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="conveyor-reuse-") as tmp:
        # CONVEYOR_KAFKA_BOOTSTRAP: an existing broker; else a LocalBroker for the run.
        broker = None
        bootstrap = os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP")
        if not bootstrap:
            broker = LocalBroker(Path(tmp) / "kafka").start()
            bootstrap = broker.bootstrap
        runs: list[dict[str, Any]] = []
        try:
            tasks = workload(args.tasks, f"b{int(time.time())}")
            for reuse in (True, False) if args.compare else (True,):
                name = "on" if reuse else "off"
                runs.append(run_stack(bootstrap, Path(tmp) / name, tasks, reuse=reuse))
                save(runs, load)  # each run's figures are kept even if a later one fails
        finally:
            if broker is not None:
                broker.stop()
    print(json.dumps(runs, indent=2))


def save(runs: list[dict[str, Any]], load: tuple[float, ...]) -> None:
    report = {
        "benchmark": "reuse",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(load, packages=("torch", "transformers")),
        "runs": runs,
        "method": " ".join(__doc__.split("\n\n")[1].split()),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
