"""Inference's side of streaming: a gate per streaming row, its pieces published as chunks.

`ChunkPublisher` owns one producer for the stream topic and the moderation signals the gates
consult; `open()` gives a `TaskStream` per streaming task and run, which `RowStreamer` feeds.
Chunks are progress, not pipeline output: they are sent without waiting for the broker's
acknowledgement and take no part in the stage's delivery or commits, and nothing here ever
raises into generation. A chunk that cannot be queued (the producer's queue is full: the
broker is slow or gone) ends that task's stream `interrupted`; the task itself is untouched.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import Counter

from conveyor.errors import BrokerError
from conveyor.kafka.config import producer as producer_conf
from conveyor.kafka.producer import KafkaProducer
from conveyor.ml.policy import Threshold, assess
from conveyor.settings import StageSettings
from conveyor.streaming.chunks import INTERRUPTED, STREAM_TOPIC, Chunk, encode_chunk
from conveyor.streaming.gate import ChunkGate, ChunkRules, Judge, Piece

log = logging.getLogger(__name__)

CHUNKS = Counter("conveyor_stream_chunks", "Partial-text chunks published by inference")
STREAM_ENDS = Counter(
    "conveyor_stream_ends", "Streams of partial text ended, by reason", ["reason"]
)
SOURCE = "/conveyor/inference"


class ChunkSender(Protocol):
    """Queues a chunk now or raises at once; never waits for the broker."""

    def send(self, chunk: Chunk) -> None: ...
    def close(self) -> None: ...


class KafkaChunkSender:
    """`ChunkSender` on the stage's Kafka cluster, through the one producer wrapper."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def send(self, chunk: Chunk) -> None:
        key, headers, value = encode_chunk(chunk, source=SOURCE)
        # queue_wait_s=0: a full local queue drops the chunk instead of stalling generation.
        self.producer.send(
            self.topic, value, key, list(headers), on_delivery=_on_delivery, queue_wait_s=0
        )
        self.producer.poll(0)  # serve delivery reports without waiting

    def close(self) -> None:
        self.producer.flush(2.0)  # best effort: the last chunks of runs that just ended


def _on_delivery(err: Any, _msg: Any) -> None:
    if err is not None:
        log.warning("stream chunk not delivered error=%s", err)


class ChunkPublisher:
    """Opens a `TaskStream` per streaming task; one per inference process."""

    def __init__(
        self,
        sender: ChunkSender,
        judge: Judge,
        rules: ChunkRules,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.sender = sender
        self.judge = judge
        self.rules = rules
        self.clock = clock

    @classmethod
    def open_kafka(
        cls,
        settings: StageSettings,
        signals: Sequence[Any],
        thresholds: dict[str, Threshold],
        rules: ChunkRules,
    ) -> ChunkPublisher:
        conf = producer_conf(settings, client_id=f"{settings.group}.stream")
        producer = KafkaProducer.open(conf, delivery_timeout_s=settings.delivery_timeout_s)
        sender = KafkaChunkSender(producer, settings.topic(STREAM_TOPIC))
        return cls(sender, moderation_judge(signals, thresholds), rules)

    def open(self, task_id: str, tenant: str, input_text: str) -> TaskStream:
        """A new run's stream for the task; its input is judged before anything is shown."""
        kwargs = {} if self.clock is None else {"clock": self.clock}
        gate = ChunkGate(self.judge, self.rules, **kwargs)
        stream = TaskStream(self.sender, gate, task_id, tenant)
        stream.emit(gate.start(input_text))
        return stream

    def close(self) -> None:
        self.sender.close()


def moderation_judge(signals: Sequence[Any], thresholds: dict[str, Threshold]) -> Judge:
    """A judge that shows only what the moderation policy allows outright."""

    def judge(text: str) -> bool:
        return assess(signals, thresholds, text).verdict == "allow"

    return judge


class TaskStream:
    """One run of one task's stream: a `TextSink` for `RowStreamer`."""

    def __init__(self, sender: ChunkSender, gate: ChunkGate, task_id: str, tenant: str) -> None:
        self.sender = sender
        self.gate = gate
        self.task_id = task_id
        self.tenant = tenant
        self.run = uuid.uuid4().hex[:16]  # tells this run's chunks from a retry's
        self.seq = 0

    def update(self, text: str) -> None:
        self.emit(self.gate.offer(text))

    def finish(self, text: str) -> None:
        self.emit(self.gate.finish(text))

    def close(self) -> None:
        self.emit(self.gate.abort())  # nothing when the stream already ended

    def emit(self, piece: Piece | None) -> None:
        if piece is None:
            return
        chunk = Chunk(
            self.task_id, self.tenant, self.run, self.seq, piece.offset, piece.text, piece.end
        )
        try:
            self.sender.send(chunk)
        except (BrokerError, BufferError) as exc:
            log.warning(
                "stream chunk not queued; stream ended task_id=%s error=%s", self.task_id, exc
            )
            self.gate.ended = self.gate.ended or INTERRUPTED
            STREAM_ENDS.labels(INTERRUPTED).inc()
            return
        self.seq += 1
        CHUNKS.inc()
        if piece.end is not None:
            STREAM_ENDS.labels(piece.end).inc()
