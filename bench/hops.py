"""The hops `bench/pipeline.py` times: raw confluent-kafka passthrough, and Conveyor relay stages.

A raw hop is the least a Kafka consumer→producer can do with the same guarantee as a stage:
`consume(500)` of what is queued (blocking only when nothing is), produce every record
unchanged, `flush()` (broker acks), commit the offsets asynchronously, with the very librdkafka
configuration the runtime uses (`conveyor.kafka.config`).
A relay stage is the real runtime (`StageRunner`) with a handler that re-emits a fixed,
schema-valid event of the stage's output type: decode, span, metrics, routing, Avro encode,
CloudEvents headers, trace propagation all run; only the model is missing. Relay stages carry the
real stage names, so topics come from the catalog, and `accepts` limits each one to the event
type of the main chain (writeback, for one, subscribes only to `conveyor.task.moderated`).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from conveyor.client import normalise_request
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import encode_binary
from conveyor.events.model import AVRO, Event
from conveyor.kafka import config
from conveyor.runtime.handler import Emit, StageContext, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]
STAGES = ("preprocess", "inference", "moderation", "writeback", "notify")
SUBMITTED = "conveyor.task.submitted.v1"
# stage -> (the event type it takes on the main chain, the type it emits)
CHAIN = {
    "preprocess": (SUBMITTED, "conveyor.task.preprocessed.v1"),
    "inference": ("conveyor.task.preprocessed.v1", "conveyor.task.inferred.v1"),
    "moderation": ("conveyor.task.inferred.v1", "conveyor.task.moderated.v1"),
    "writeback": ("conveyor.task.moderated.v1", "conveyor.task.stored.v1"),
    "notify": ("conveyor.task.stored.v1", "conveyor.task.notified.v1"),
}
FINAL_TOPIC = "conveyor.task.notified"
_TASK = {
    "task_id": "bench",
    "tenant": "acme",
    "kind": "embed",
    "priority": "normal",
    "callback_url": None,
    "deadline": None,
    "submitted_at": "2026-01-01T00:00:00+00:00",
    "model": None,
    "params": {},
}
OUTPUT_DATA: Mapping[str, Mapping[str, Any]] = {
    "conveyor.task.preprocessed.v1": {
        "task": _TASK,
        "input": "hello pipeline",
        "prompt": "hello pipeline",
        "token_count": 3,
        "labels": [],
    },
    "conveyor.task.inferred.v1": {
        "task": _TASK,
        "input": "hello pipeline",
        "model": "noop",
        "text": None,
        "embedding": None,
        "label": "ok",
        "label_scores": {"ok": 1.0},
        "inference_ms": 0.0,
    },
    "conveyor.task.moderated.v1": {
        "task": _TASK,
        "model": "noop",
        "text": None,
        "embedding": None,
        "label": "ok",
        "label_scores": {"ok": 1.0},
        "verdict": "allow",
        "scores": {"profanity": 0.01},
        "reasons": [],
    },
    "conveyor.task.stored.v1": {
        "task": _TASK,
        "status": "completed",
        "verdict": "allow",
        "result": '{"label":"ok"}',
        "error": None,
    },
    "conveyor.task.notified.v1": {
        "task_id": "bench",
        "tenant": "acme",
        "status": "completed",
        "channel": "none",
        "http_status": None,
        "delivered_at": "2026-01-01T00:00:00+00:00",
    },
}


def output_for(event: Event, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` (an `OUTPUT_DATA` entry) for `event`'s task: the task id in the data is the task's
    identity (record key, subject, event ids), so each record keeps its own, as a real stage's
    output would."""
    return {**data, "task": {**_TASK, "task_id": event.subject or ""}}


def relay_service(stage: str) -> StageService[StageSettings]:
    accepts, emits = CHAIN[stage]
    data = OUTPUT_DATA[emits]
    topic = "conveyor.task.preprocessed.normal" if stage == "preprocess" else None

    def relay(event: Event, _ctx: StageContext[Any]) -> Emit:
        return Emit(emits, output_for(event, data), topic=topic)

    return StageService(stage, StageSettings, handle=relay, accepts=(accepts,))


def input_records(n: int, run: str) -> list[Record]:
    """`n` task-submitted events (binary mode, Avro), as `TaskClient` publishes them."""
    spec = load_catalog().spec(SUBMITTED)
    assert spec is not None
    schemas = default_schemas()
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    out = []
    for i in range(n):
        data = normalise_request(
            {"task_id": f"{run}-{i}", "tenant": "acme", "kind": "embed", "input": "hello pipeline"}
        )
        event = Event(
            id=str(uuid.uuid4()),
            type=SUBMITTED,
            source="/bench",
            subject=data["task_id"],
            data=data,
            datacontenttype=AVRO,
            dataschema=spec.dataschema,
            time=now,
            extensions={"tenant": "acme", "priority": "normal"},
        )
        headers, value = encode_binary(event, schemas)
        out.append((data["task_id"].encode(), value, headers))
    return out


def run_relay(stage: str, bootstrap: str, prefix: str, env: dict[str, str], stop: Any) -> None:
    """Process entry: one relay stage until `stop` is set (tracing on when `env` says so)."""
    os.environ.update(env)
    # WARNING: no per-record outcome line (bench/overhead.py measures what INFO costs).
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"), stream=devnull)
    from conveyor.telemetry.tracing import init_tracing, shutdown_tracing

    init_tracing(stage)
    settings = StageSettings(stage=stage, kafka_bootstrap=bootstrap, topic_prefix=prefix)
    runner = StageRunner(relay_service(stage), settings)
    threading.Thread(target=lambda: (stop.wait(), runner.stop()), daemon=True).start()
    runner.start()
    gc.freeze()  # as conveyor.runtime.entry does after start-up
    runner.run()
    shutdown_tracing()


def run_raw_hop(bootstrap: str, source: str, target: str, group: str, stop: Any) -> None:
    """Process entry: a raw consume → produce → flush → commit passthrough until `stop`."""
    settings = StageSettings(stage=group, kafka_bootstrap=bootstrap, group_id=group)
    consumer = Consumer(config.consumer(settings, client_id=f"raw-{group}"))
    producer = Producer(config.producer(settings, client_id=f"raw-{group}"))
    consumer.subscribe([source])
    while not stop.is_set():
        # As the runtime polls: take what is queued without waiting, block only for the first
        # record of an idle hop. consume(n, t) alone holds a record up to t for company, which
        # at a low rate adds the whole poll timeout to every hop's latency.
        batch = consumer.consume(settings.batch_max, 0)
        if not batch:
            batch = consumer.consume(1, settings.poll_timeout_ms / 1000)
        offsets: dict[tuple[str, int], int] = {}
        for msg in batch:
            if msg.error() is not None:
                continue
            producer.produce(target, msg.value(), msg.key(), headers=msg.headers())
            offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
        if offsets:
            producer.flush(30)
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=True,
            )
    consumer.close()
