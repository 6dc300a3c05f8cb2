"""Chunks through the real broker: inference's publisher to the stream topic, read by two
gateway-side feeds, one started before the stream and one after it ended (a replica added or
restarted mid-stream). Both rebuild the same text; a record that is not a chunk is skipped."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Producer

from conveyor.settings import StageSettings
from conveyor.streaming.chunks import COMPLETE, STREAM_TOPIC, Chunk
from conveyor.streaming.feed import StreamFeed
from conveyor.streaming.gate import ChunkRules
from conveyor.streaming.hub import StreamHub
from conveyor.streaming.publisher import ChunkPublisher
from tests.support import apply

TEXT = "Rivers carry water from the hills to the sea, shaping valleys as they go."
WORDS = TEXT.split(" ")


class Collector:
    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.lock = threading.Lock()

    def __call__(self, chunks: list[Chunk]) -> None:
        with self.lock:
            self.chunks.extend(chunks)

    def ended(self) -> bool:
        with self.lock:
            return any(c.end == COMPLETE for c in self.chunks)


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def rebuilt(chunks: list[Chunk]) -> tuple[str, str | None]:
    hub = StreamHub(max_tasks=10, ttl_s=600)
    hub.apply(chunks)
    state = hub.streams[("acme", "t-1")]
    return state.text, state.end


def test_every_feed_rebuilds_the_stream_whenever_it_started(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    apply(kafka_bootstrap, topic_prefix, partitions=2)
    settings = StageSettings(
        kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, stage="inference"
    )
    early, late = Collector(), Collector()
    first = StreamFeed(settings, replay_s=60)
    assert first.start(early, wait_s=60), "the stream topic was not assigned"
    junk = Producer({"bootstrap.servers": kafka_bootstrap})
    junk.produce(settings.topic(STREAM_TOPIC), b"not a chunk", b"t-1")
    junk.flush(30)
    publisher = ChunkPublisher.open_kafka(settings, [], {}, ChunkRules(1, 0.25))
    second = StreamFeed(settings, replay_s=60)
    try:
        stream = publisher.open("t-1", "acme", "Tell me about rivers.")
        for n in range(1, len(WORDS) + 1):
            stream.update(" ".join(WORDS[:n]))
        stream.finish(" ".join(WORDS))
        publisher.close()  # flushes what is queued
        wait_for(early.ended, "the first feed to read the whole stream")
        assert second.start(late, wait_s=60)
        wait_for(late.ended, "the late feed to replay the whole stream")
    finally:
        first.stop()
        second.stop()
    assert rebuilt(early.chunks) == rebuilt(late.chunks) == (" ".join(WORDS), COMPLETE)
    assert len(early.chunks) > 3
    assert [c.seq for c in early.chunks] == list(range(len(early.chunks)))
