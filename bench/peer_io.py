"""The source and the sink of `bench/peers.py`, each its own process, driven over a pipe.

The source builds a round's records before its clock starts, then writes them to a contender's
first topic either in one burst (a saturated round: faster than any contender drains them) or
paced at a fixed rate (a latency round), and answers with the wall-clock time of each produce
call. The sink reads every contender's last topic (assigned partitions, no group, so it is
reading before any record exists) and answers, per round, the wall-clock time each record first
arrived; it also counts every arrival by key over the whole run, so duplicates that come late
are still found. Records are keyed `<tag>-<index>`: every contender keeps the key (Conveyor's
output key is the task id, which is the source's key), so latency is per record, by key.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any, cast

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from hops import OUTPUT_DATA

from conveyor.client import normalise_request
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import encode_binary
from conveyor.events.model import AVRO, Event

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]
SUBMITTED = "conveyor.task.submitted.v1"
PREPROCESSED = "conveyor.task.preprocessed.v1"
# The source's produce loop: serve delivery reports this often so its queue never fills.
POLL_EVERY = 1_000
# At the end the sink reads on until its topics were quiet this long (bounded by DRAIN_MAX_S):
# a duplicate a contender writes after a round was counted still shows.
DRAIN_QUIET_S = 2.0
DRAIN_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class SourceJob:
    """`n` records of `form` keyed `<tag>-<i>` into `topic`; `rate` 0 = one burst."""

    topic: str
    tag: str
    n: int
    form: str  # "avro" (task-submitted event), "json" (its data as JSON), "preprocessed"
    rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Collect:
    """Sink: wait until every `<tag>-<i>`, i < n, arrived or `timeout_s` passed."""

    tag: str
    n: int
    timeout_s: float


def records(job: SourceJob) -> list[Record]:
    """The job's records; built before the clock starts (~40 µs each)."""
    build = _FORMS[job.form]
    schemas = default_schemas()
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return [build(f"{job.tag}-{i}", now, schemas) for i in range(job.n)]


def _submitted(key: str, now: str, schemas: Any) -> Record:
    data = normalise_request(
        {"task_id": key, "tenant": "acme", "kind": "embed", "input": "hello pipeline"}
    )
    return _event(key, SUBMITTED, data, now, schemas)


def _submitted_json(key: str, now: str, schemas: Any) -> Record:
    # The same CloudEvents headers as the Avro record; the same task data, as JSON (Quix's
    # default serializer) in place of Avro.
    _, _, headers = _submitted(key, now, schemas)
    data = normalise_request(
        {"task_id": key, "tenant": "acme", "kind": "embed", "input": "hello pipeline"}
    )
    headers = [(k, b"application/json" if k == "content-type" else v) for k, v in headers]
    return key.encode(), json.dumps(data).encode(), headers


def _preprocessed(key: str, now: str, schemas: Any) -> Record:
    return _event(key, PREPROCESSED, OUTPUT_DATA[PREPROCESSED], now, schemas)


def _event(key: str, event_type: str, data: Any, now: str, schemas: Any) -> Record:
    spec = load_catalog().spec(event_type)
    assert spec is not None
    event = Event(
        id=str(uuid.uuid4()),
        type=event_type,
        source="/bench",
        subject=key,
        data=data,
        datacontenttype=AVRO,
        dataschema=spec.dataschema,
        time=now,
        extensions={"tenant": "acme", "priority": "normal"},
    )
    headers, value = encode_binary(event, schemas)
    return key.encode(), value, headers


_FORMS: dict[str, Callable[[str, str, Any], Record]] = {
    "avro": _submitted,
    "json": _submitted_json,
    "preprocessed": _preprocessed,
}


def run_source(bootstrap: str, conn: Connection) -> None:
    """Process entry: serve SourceJobs until None.

    Per job: build the records, answer "built", wait for "go" (the caller starts its clocks in
    between), write them, answer the time of each produce call.
    """
    # linger 1 ms: a burst still fills batches, a paced record is not held back for company.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    while (job := conn.recv()) is not None:
        batch = records(job)
        conn.send("built")
        if conn.recv() != "go":
            raise RuntimeError("source: expected go")
        conn.send(_produce(producer, job, batch))
    producer.flush(30)


def _produce(producer: Producer, job: SourceJob, batch: list[Record]) -> list[float]:
    sent: list[float] = []
    started = time.time()
    for i, (key, value, headers) in enumerate(batch):
        if job.rate:
            delay = started + i / job.rate - time.time()
            if delay > 0:
                time.sleep(delay)
        sent.append(time.time())
        _produce_one(producer, job.topic, key, value, headers)
        if job.rate or i % POLL_EVERY == 0:
            producer.poll(0)
    if producer.flush(30):
        raise RuntimeError(f"source: records of {job.tag} not acknowledged in 30 s")
    return sent


def _produce_one(
    producer: Producer, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    for _ in range(1_000):  # bounded: 1,000 × 10 ms of draining is far past any sane stall
        try:
            producer.produce(topic, value, key, headers=cast(Any, headers))  # stubs: str values
            return
        except BufferError:
            producer.poll(0.01)
    raise RuntimeError("source: producer queue stayed full")


def run_sink(bootstrap: str, topics: list[str], partitions: int, conn: Connection) -> None:
    """Process entry: read the (fresh) `topics`; serve Collects until None, then all counts."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-sink-{uuid.uuid4().hex}",  # never joins: assign, no commit
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,  # an idle fetch returns soon: the sink's clock stays close
        }
    )
    consumer.assign(
        [TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(partitions)]
    )
    seen: Counter[str] = Counter()
    conn.send("ready")
    while (ask := conn.recv()) is not None:
        conn.send(_collect(consumer, ask, seen))
    _drain(consumer, seen)
    conn.send(dict(seen))
    consumer.close()


def _collect(consumer: Consumer, ask: Collect, seen: Counter[str]) -> list[float | None]:
    arrived: list[float | None] = [None] * ask.n
    missing = ask.n
    prefix = f"{ask.tag}-"
    deadline = time.monotonic() + ask.timeout_s
    while missing and time.monotonic() < deadline:
        # consume(n, t) holds what it has until n records or t: at 200/s that stamped records
        # up to 50 ms late. Take what is queued at once; block only for the first record.
        batch = consumer.consume(1_000, 0) or consumer.consume(1, 0.05)
        now = time.time()
        for msg in batch:
            if msg.error() is not None:
                continue
            key = (msg.key() or b"").decode()
            seen[key] += 1
            if key.startswith(prefix) and seen[key] == 1:
                index = int(key[len(prefix) :])
                if index < ask.n:
                    arrived[index] = now
                    missing -= 1
    return arrived


def _drain(consumer: Consumer, seen: Counter[str]) -> None:
    """Read what is left (late duplicates) until the topics stay quiet for DRAIN_QUIET_S."""
    deadline = time.monotonic() + DRAIN_MAX_S
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < DRAIN_QUIET_S:
        for msg in consumer.consume(1_000, 0.1):
            if msg.error() is None:
                seen[(msg.key() or b"").decode()] += 1
                quiet_since = time.monotonic()
