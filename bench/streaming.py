"""What streaming costs inference, and what it gives the reader: SmolLM2 on the CPU, in one process.

One batch of greedy generate tasks (``--tasks`` prompts, ``--tokens`` new tokens each) runs
unstreamed and streamed, interleaved round by round so a neighbour's load hits both alike.
Streamed, every row has a real stream: `RowStreamer` decodes its tokens, the gate chunks them
and judges each chunk with the real moderation signals (alt-profanity-check and the default
blocklist), and each chunk is encoded as its Kafka record (Avro CloudEvent); only the produce
call is left out (it queues without waiting, a few µs). Reports, per configuration, the median
wall and CPU seconds of the batch, the chunks and moderation passes per task, and, streamed,
when a task's first partial text was ready against when its result was, and writes them with
the machine to ``bench/results/streaming.json``.

    python bench/streaming.py [--tasks 8] [--tokens 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.machine import machine
from conveyor.ml.generator import GenParams
from conveyor.ml.policy import PolicySettings, assess, build_signals, default_thresholds
from conveyor.ml.registry import ModelRegistry
from conveyor.streaming.chunks import Chunk, encode_chunk
from conveyor.streaming.gate import ChunkRules
from conveyor.streaming.publisher import ChunkPublisher

RESULTS = Path(__file__).resolve().parent / "results" / "streaming.json"
PROMPTS = [
    "Write three sentences about rivers.",
    "Explain what a message broker does.",
    "Describe a sunny day at the beach.",
    "Give advice for a first job interview.",
    "Summarise the water cycle for a child.",
    "Why do leaves change colour in autumn?",
    "List some uses of a spreadsheet.",
    "Describe how bread is made.",
]


class TimedSender:
    """Encodes each chunk as its record and notes when the first one of each task was ready."""

    def __init__(self) -> None:
        self.chunks = 0
        self.first: dict[str, float] = {}

    def send(self, chunk: Chunk) -> None:
        encode_chunk(chunk, source="/bench")
        self.chunks += 1
        if chunk.text:
            self.first.setdefault(chunk.task_id, time.perf_counter())

    def close(self) -> None:
        pass


def run(
    gen: Any, prompts: list[str], tokens: int, signals: list[Any], stream: bool
) -> dict[str, Any]:
    params = [GenParams(max_new_tokens=tokens)] * len(prompts)
    sender = TimedSender()
    judged = [0]
    thresholds = default_thresholds()

    def judge(text: str) -> bool:
        judged[0] += 1
        return assess(signals, thresholds, text).verdict == "allow"

    publisher = ChunkPublisher(sender, judge, ChunkRules())
    sinks = (
        {i: publisher.open(f"t{i}", "bench", p) for i, p in enumerate(prompts)} if stream else {}
    )
    t0, c0 = time.perf_counter(), time.process_time()
    gen.generate(prompts, params, sinks=sinks or None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out: dict[str, Any] = {"wall_s": wall, "cpu_s": cpu}
    if stream:
        firsts = [sender.first[t] - t0 for t in sorted(sender.first)]
        out |= {
            "chunks_per_task": sender.chunks / len(prompts),
            "moderation_passes_per_task": judged[0] / len(prompts),
            "first_partial_text_s": statistics.median(firsts) if firsts else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()
    gen = ModelRegistry().for_kind("generate")
    signals = build_signals(PolicySettings(), lambda: None)  # type: ignore[arg-type,return-value]
    prompts = (PROMPTS * (args.tasks // len(PROMPTS) + 1))[: args.tasks]
    run(gen, prompts[:1], 4, signals, True)  # warm up: first calls allocate
    rounds: dict[str, list[dict[str, Any]]] = {"unstreamed": [], "streamed": []}
    for _ in range(args.rounds):
        for name in rounds:
            rounds[name].append(run(gen, prompts, args.tokens, signals, name == "streamed"))
    summary = {
        name: {
            key: statistics.median(r[key] for r in runs)
            for key in runs[0]
            if runs[0][key] is not None
        }
        for name, runs in rounds.items()
    }
    summary["streamed_over_unstreamed"] = {
        "wall": summary["streamed"]["wall_s"] / summary["unstreamed"]["wall_s"],
        "cpu": summary["streamed"]["cpu_s"] / summary["unstreamed"]["cpu_s"],
    }
    report = {
        "what": f"{args.tasks} greedy SmolLM2 tasks x {args.tokens} new tokens, one batch, CPU",
        "rounds": args.rounds,
        "summary": summary,
        "runs": rounds,
        "machine": machine(load, packages=("torch", "transformers")),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
