"""The pipelined-inference scenario of `bench/peers.py`: a slow model behind the real runtime.

The model is a stand-in with the shape that matters: a fixed 50 ms per batch of up to 32 records
that releases the GIL while it runs (`time.sleep`, as a GPU kernel does). It runs (a) as the
batch handler of an `inference` stage on the real runtime (`StageRunner`), fed task-preprocessed
events from one topic and emitting task-inferred events to the next, tracing off, and (b) called
back to back in a plain loop, no Kafka. ARCHITECTURE.md §10 asks (a) to reach >= 90% of (b): the
model must not sit idle while the loop polls, produces, waits for acks and commits.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from hops import OUTPUT_DATA, output_for

from conveyor.events.model import Event
from conveyor.runtime.handler import BatchOutcome, Emit, StageContext, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings

MODEL_BATCH = 32
MODEL_SECONDS = 0.050
STAGE = "inference"
PREPROCESSED = "conveyor.task.preprocessed.v1"
INFERRED = "conveyor.task.inferred.v1"
INPUT_TOPIC = "conveyor.task.preprocessed.normal"
OUTPUT_TOPIC = "conveyor.task.inferred"


def model(n: int) -> None:
    """Infer `n` records: 50 ms per batch of up to 32, the GIL released throughout."""
    for _ in range(-(-n // MODEL_BATCH)):
        time.sleep(MODEL_SECONDS)


def bare_model_rate(n: int) -> float:
    """Records/s of the model called back to back on `n` records in batches of 32."""
    started = time.perf_counter()
    for first in range(0, n, MODEL_BATCH):
        model(min(MODEL_BATCH, n - first))
    return n / (time.perf_counter() - started)


def model_service(calls: Any, records: Any) -> StageService[StageSettings]:
    """The stage; `calls` / `records` (shared counters) show the batch sizes it was handed."""
    data = OUTPUT_DATA[INFERRED]

    def infer(events: Sequence[Event], _ctx: StageContext[Any]) -> list[BatchOutcome]:
        calls.value += 1
        records.value += len(events)
        model(len(events))
        return [Emit(INFERRED, output_for(event, data)) for event in events]

    return StageService(STAGE, StageSettings, handle_batch=infer, accepts=(PREPROCESSED,))


def run_model_stage(
    bootstrap: str, prefix: str, batch_max: int, counters: tuple[Any, Any], stop: Any
) -> None:
    """Process entry: the inference stage with the stand-in model until `stop` is set."""
    os.environ["OTEL_SDK_DISABLED"] = "true"
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"), stream=devnull)
    settings = StageSettings(
        stage=STAGE, kafka_bootstrap=bootstrap, topic_prefix=prefix, batch_max=batch_max
    )
    runner = StageRunner(model_service(*counters), settings)

    def stop_when_told() -> None:
        stop.wait()
        runner.stop()

    threading.Thread(target=stop_when_told, daemon=True).start()
    runner.start()
    gc.freeze()  # as conveyor.runtime.entry does after start-up
    runner.run()
