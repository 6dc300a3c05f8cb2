"""Prometheus metrics every stage exposes on `/metrics` (names prefixed `conveyor_`).

Label children are bound once per (stage, topic) and cached: a labelled counter plus a
histogram observation costs ~3 µs, a `labels()` lookup per record would double that.
"""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter(
    "conveyor_events_consumed", "Records taken from Kafka by a stage", ["stage", "topic"]
)
EVENTS_EMITTED = Counter(
    "conveyor_events_emitted",
    "Records a stage produced and the broker acknowledged",
    ["stage", "topic"],
)
HANDLER_DURATION = Histogram(
    "conveyor_handler_duration_seconds",
    "Time in the stage's handler per batch",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
E2E_LATENCY = Histogram(
    "conveyor_e2e_latency_seconds",
    "Time since the task was submitted, when a stage finishes it",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RETRIES = Counter("conveyor_retries", "Records sent up the retry ladder", ["stage", "rung"])
DEAD_LETTERS = Counter("conveyor_dead_letters", "Records dead-lettered", ["stage", "reason"])
BATCH_SIZE = Histogram(
    "conveyor_batch_size",
    "Records per handled batch",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
IN_FLIGHT = Gauge("conveyor_in_flight", "Records taken but not yet committed", ["stage"])
PAUSED_PARTITIONS = Gauge(
    "conveyor_paused_partitions", "Partitions paused (retry rungs waiting)", ["stage"]
)
CONSUMER_LAG = Gauge(
    "conveyor_consumer_lag",
    "High watermark minus committed offset",
    ["stage", "topic", "partition"],
)
# Set by conveyor.telemetry.gpu (inference, only where CUDA is present).
GPU_MEMORY = Gauge("conveyor_gpu_memory_bytes", "CUDA device memory in use", ["stage", "device"])
GPU_UTILISATION = Gauge(
    "conveyor_gpu_utilization_ratio", "CUDA device utilisation, 0..1", ["stage", "device"]
)


class StageMetrics:
    """The metrics of one stage, with label children cached per topic."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._consumed: dict[str, Counter] = {}
        self._emitted: dict[str, Counter] = {}
        self.handler = HANDLER_DURATION.labels(stage)
        self.e2e = E2E_LATENCY.labels(stage)
        self.batch = BATCH_SIZE.labels(stage)
        self.in_flight = IN_FLIGHT.labels(stage)
        self.paused = PAUSED_PARTITIONS.labels(stage)

    def consumed(self, topic: str) -> Counter:
        child = self._consumed.get(topic)
        if child is None:
            child = self._consumed[topic] = EVENTS_CONSUMED.labels(self.stage, topic)
        return child

    def emitted(self, topic: str) -> Counter:
        child = self._emitted.get(topic)
        if child is None:
            child = self._emitted[topic] = EVENTS_EMITTED.labels(self.stage, topic)
        return child

    def retried(self, rung: int) -> None:
        RETRIES.labels(self.stage, str(rung)).inc()

    def dead_lettered(self, reason: str) -> None:
        DEAD_LETTERS.labels(self.stage, reason).inc()

    def lag(self, topic: str, partition: int, value: int) -> None:
        CONSUMER_LAG.labels(self.stage, topic, str(partition)).set(value)

    def drop_lag(self, topic: str, partition: int) -> None:
        """Forget a partition's lag series (revoked: another instance reports it now)."""
        with contextlib.suppress(KeyError):  # never reported
            CONSUMER_LAG.remove(self.stage, topic, str(partition))


# Result reuse (conveyor.reuse) in inference: one lookup per record that could run the model.
# outcome: hit (stored result reused), coalesced (identical record in the same batch), wait
# (identical task running elsewhere: retried), miss (the model runs), bypass (not reusable).
REUSE_LOOKUPS = Counter(
    "conveyor_reuse_lookups", "Result reuse lookups by outcome", ["stage", "kind", "outcome"]
)
MODEL_RECORDS = Counter(
    "conveyor_model_records",
    "Records a model ran (reused results are not counted)",
    ["stage", "kind", "model"],
)
