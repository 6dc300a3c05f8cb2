"""Typed handlers: what reading a typed payload and writing one back costs per record.

In process, no broker: the records are what the Avro decoder hands a stage (decoded once, up
front, through the real codec), so only the typed seam is timed:

- `read`: `TaskPreprocessed.from_data` of a decoded record (inference's input), and
  `TaskInferred.from_data` (moderation's);
- `write`: building the `TaskInferred` a handler emits and its `to_data()` (what the codec
  encodes), against building the same dict by hand as the handlers did before;
- `baseline`: building the runtime's own `Event` per record, and copying the decoded dict,
  to read the figures against on a loaded machine;
- `seam`: a no-op batch handler of 64 records called through `TypedService.run_batch` (payloads
  read, typed records made, outcomes checked) against the same handler called with the raw
  events: the seam's whole cost per record.

Each figure is the median and the minimum of `--rounds` rounds of `--n` records, in
microseconds per record, the works interleaved within each round.
Writes bench/results/typed_payloads.json.

    python bench/typed_payloads.py [--n 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))

from conveyor.events.avro import default_schemas, schema_urn  # noqa: E402
from conveyor.events.catalog import INFERRED_TYPE, PREPROCESSED_TYPE  # noqa: E402
from conveyor.events.model import Event  # noqa: E402
from conveyor.events.payloads import TaskInferred, TaskPreprocessed  # noqa: E402
from conveyor.runtime.handler import BatchOutcome, Emit  # noqa: E402
from conveyor.runtime.typed import Context, Record, TypedService, emit, payload_of  # noqa: E402
from conveyor.settings import StageSettings  # noqa: E402

BATCH = 64
TASK = {
    "task_id": "t-000001",
    "tenant": "acme",
    "kind": "generate",
    "priority": "normal",
    "callback_url": "https://hooks.example/acme",
    "deadline": None,
    "submitted_at": "2026-11-23T00:00:00+00:00",
    "model": "smollm2",
    "params": {"max_new_tokens": "32", "temperature": "0.7"},
}
PREPROCESSED = {
    "task": TASK,
    "input": "What is the capital of France?",
    "prompt": "Answer briefly.\nQuestion: What is the capital of France?",
    "token_count": 14,
    "labels": [],
}
INFERRED = {
    "task": TASK,
    "input": PREPROCESSED["input"],
    "model": "smollm2",
    "text": "Paris.",
    "embedding": None,
    "label": None,
    "label_scores": {},
    "inference_ms": 12.5,
}


def decoded(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """`data` as the stage receives it: encoded and decoded by the real Avro codec."""
    schemas = default_schemas()
    payload = schemas.encode(name, 1, data)
    return schemas.decode_urn(schema_urn(name, 1), payload)[1]


def interleaved(works: dict[str, Callable[[], object]], n: int, rounds: int) -> dict[str, Any]:
    """Each work's microseconds per record: median and minimum over `rounds` rounds, the works
    run in turn within each round, so a burst of load on a shared machine hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            started = time.perf_counter()
            work()
            samples[name].append((time.perf_counter() - started) / n * 1e6)
    return {
        name: {"median": round(statistics.median(s), 3), "min": round(min(s), 3)}
        for name, s in samples.items()
    }


def noop_typed(records: Sequence[Record[Any]], _ctx: Any) -> list[BatchOutcome]:
    return [None] * len(records)


def noop_raw(events: Sequence[Event], _ctx: Any) -> list[BatchOutcome]:
    return [None] * len(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/typed_payloads.json")
    args = parser.parse_args()
    n, rounds = args.n, args.rounds
    pre = [decoded("task-preprocessed", PREPROCESSED) for _ in range(n)]
    inf = [decoded("task-inferred", INFERRED) for _ in range(n)]
    typed_pre = [TaskPreprocessed.from_data(d) for d in pre]
    result = {"text": "Paris."}

    def by_hand() -> None:
        for d in typed_pre:
            data = {"task": TASK, "input": d.input, "model": "smollm2", "inference_ms": 1.0}
            Emit(INFERRED_TYPE, {**data, **result})

    def typed_write() -> None:
        for d in typed_pre:
            out = TaskInferred(
                task=d.task,
                input=d.input,
                model="smollm2",
                text=result.get("text"),
                inference_ms=1.0,
            )
            emit(out)

    events = [Event(f"e{i}", PREPROCESSED_TYPE, "/b", f"t{i}", d) for i, d in enumerate(pre)]
    batches = [events[i : i + BATCH] for i in range(0, n, BATCH)]
    service = TypedService(
        "inference",
        StageSettings,
        payload=payload_of(TaskPreprocessed),
        setup=lambda _s: None,
        handle_batch=noop_typed,
    )
    ctx = Context("inference", StageSettings(stage="inference"), logging.getLogger("b"), None)
    works: dict[str, Callable[[], object]] = {
        "read_preprocessed": lambda: [TaskPreprocessed.from_data(d) for d in pre],
        "read_inferred": lambda: [TaskInferred.from_data(d) for d in inf],
        "write_inferred_typed": typed_write,
        "write_inferred_by_hand": by_hand,
        "seam_batch_typed": lambda: [service.run_batch(b, ctx) for b in batches],
        "seam_batch_raw": lambda: [noop_raw(b, ctx) for b in batches],
        # Calibration on this machine: the runtime's own per-record object (one frozen slotted
        # `Event`, built by the codec for every record) and a plain copy of the decoded dict.
        "baseline_event": lambda: [
            Event(f"e{i}", PREPROCESSED_TYPE, "/b", "t", d, time="x") for i, d in enumerate(pre)
        ],
        "baseline_dict_copy": lambda: [{**d, "task": {**d["task"]}} for d in pre],
    }
    figures = interleaved(works, n, rounds)
    report = {
        "records": n,
        "rounds": rounds,
        "batch": BATCH,
        "unit": "microseconds per record",
        "python": sys.version.split()[0],
        "load_average_1m": round(os.getloadavg()[0], 2),
        **figures,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
