"""The chunk event: one piece of a streaming task's partial text, as a Kafka record.

A `conveyor.task.chunk.v1` CloudEvent in binary mode, Avro data (`schemas/task-chunk.v1.avsc`),
key = task id, so a task's chunks stay in order on one partition. The stream topic is not in
the stage catalog: no stage consumes it and nothing stores it. Its records expire after an
hour (a generate task's whole life, plus a gateway replica's replay window), and its segments
roll every ten minutes so that retention can delete them at all: Kafka deletes whole closed
segments, and the default segment lives a week.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from conveyor.events.avro import default_schemas, schema_urn
from conveyor.events.codec import DecodeError, Headers, RawHeaders, decode, encode_binary
from conveyor.events.model import AVRO, TENANT, Event

STREAM_TOPIC = "conveyor.task.stream"
STREAM_TOPIC_CONFIG = {
    "cleanup.policy": "delete",
    "retention.ms": str(3600 * 1000),
    "segment.ms": str(600 * 1000),
}
CHUNK_TYPE = "conveyor.task.chunk.v1"
CHUNK_SCHEMA = schema_urn("task-chunk", 1)
# Why a run's stream ended: all of it was sent; the moderation gate stopped it (the task itself
# goes on); or the run failed or could not publish (a retry may start a new run).
COMPLETE, MODERATION, INTERRUPTED = "complete", "moderation", "interrupted"


@dataclass(frozen=True, slots=True)
class Chunk:
    task_id: str
    tenant: str
    run: str
    seq: int
    offset: int  # where `text` starts in the partial text, in code points
    text: str
    end: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The task, as the gateway names it: (tenant, task id)."""
        return (self.tenant, self.task_id)


def encode_chunk(chunk: Chunk, *, source: str) -> tuple[bytes, Headers, bytes]:
    """Key, headers and value of `chunk` on the stream topic."""
    event = Event(
        id=f"{chunk.run}-{chunk.seq}",  # unique per chunk; readers need no deduplication
        type=CHUNK_TYPE,
        source=source,
        subject=chunk.task_id,
        time=datetime.now(UTC).isoformat(timespec="milliseconds"),
        datacontenttype=AVRO,
        dataschema=CHUNK_SCHEMA,
        data={
            "task_id": chunk.task_id,
            "tenant": chunk.tenant,
            "run": chunk.run,
            "seq": chunk.seq,
            "offset": chunk.offset,
            "text": chunk.text,
            "end": chunk.end,
        },
        extensions={TENANT: chunk.tenant},
    )
    headers, value = encode_binary(event, default_schemas())
    return chunk.task_id.encode(), headers, value


def decode_chunk(headers: RawHeaders, value: bytes | None) -> Chunk:
    """The chunk in a stream-topic record; `DecodeError`/`SchemaError` (both `PermanentError`)
    when it is not one."""
    event = decode(headers, value, default_schemas())
    if event.type != CHUNK_TYPE:
        raise DecodeError(f"not a chunk event: {event.type!r}")
    data = event.data
    return Chunk(
        task_id=data["task_id"],
        tenant=data["tenant"],
        run=data["run"],
        seq=data["seq"],
        offset=data["offset"],
        text=data["text"],
        end=data.get("end"),
    )
