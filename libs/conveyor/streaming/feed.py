"""The gateway's reader of the stream topic: every partition, from a short while ago, on a thread.

Every gateway replica reads every chunk, whichever replica holds a task's WebSocket: a
client may connect to any replica, and a replica restarted or added mid-stream still serves the
streams in progress. So the reader is not in a consumer group (no group shares out the
partitions, nothing is committed): it assigns itself all partitions, starting at the first
chunk published `replay_s` ago. The cost is that each replica reads all the chunks; chunks are
small and short-lived, and their volume is bounded by the generation rate of the inference
fleet (docs/streaming.md has the figures).

A record that is not a chunk is logged and skipped: the topic is not a pipeline input and has
no dead-letter topic. A missing topic is waited for (checked every `_RETRY_S`), so a gateway
started before `conveyor topics apply` begins streaming once the topic exists.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from conveyor.errors import PermanentError
from conveyor.kafka.config import common
from conveyor.settings import KafkaSettings
from conveyor.streaming.chunks import STREAM_TOPIC, Chunk, decode_chunk

log = logging.getLogger(__name__)
_POLL_S = 0.1  # how often the thread notices a stop; chunks arrive as soon as they are fetched
_BATCH = 500  # records handed to the event loop at once, at most
_RETRY_S = 5.0  # wait between checks for a missing topic or an unreachable broker
_META_TIMEOUT_S = 10.0


class StreamFeed:
    def __init__(self, settings: KafkaSettings, *, replay_s: float) -> None:
        self.settings = settings
        self.topic = settings.topic(STREAM_TOPIC)
        self.replay_s = replay_s
        self.ready = threading.Event()  # set once the partitions are assigned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Any = None

    def start(self, deliver: Callable[[list[Chunk]], None], *, wait_s: float = 10.0) -> bool:
        """Read on a thread, handing each batch of chunks to `deliver`; True when the
        partitions were assigned within `wait_s` (else they are once the topic exists)."""
        self._thread = threading.Thread(
            target=self._run, args=(deliver,), name="stream-feed", daemon=True
        )
        self._thread.start()
        return self.ready.wait(wait_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_META_TIMEOUT_S + 5)

    def _run(self, deliver: Callable[[list[Chunk]], None]) -> None:
        conf = {
            **common(self.settings),
            # A name of its own that never commits, so the broker keeps no group for it.
            "group.id": f"{self.settings.topic_prefix}conveyor.gateway.stream.{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "client.id": "conveyor-gateway-stream",
            # Chunks should reach sockets promptly: do not let the broker hold a fetch long.
            "fetch.wait.max.ms": 100,
        }
        consumer = Consumer(conf)
        try:
            if not self._assign(consumer):
                return
            while not self._stop.is_set():
                chunks = self._read(consumer)
                if chunks:
                    deliver(chunks)
        except Exception:  # the feed is a convenience: it must never take the gateway down
            log.exception("stream feed stopped; no more partial text on this replica")
        finally:
            consumer.close()

    def _assign(self, consumer: Consumer) -> bool:
        while not self._stop.is_set():
            try:
                partitions = self._starts(consumer)
            except KafkaException as exc:
                log.warning("stream topic not readable yet topic=%s error=%s", self.topic, exc)
                partitions = None
            if partitions:
                consumer.assign(partitions)
                self.ready.set()
                log.info("stream feed assigned topic=%s partitions=%d", self.topic, len(partitions))
                return True
            self._stop.wait(_RETRY_S)
        return False

    def _starts(self, consumer: Consumer) -> list[TopicPartition] | None:
        """Each partition at its first chunk since `replay_s` ago (or its end), or None when the
        topic does not exist yet."""
        meta = consumer.list_topics(self.topic, timeout=_META_TIMEOUT_S).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        since_ms = int((time.time() - self.replay_s) * 1000)
        wanted = [TopicPartition(self.topic, p, since_ms) for p in sorted(meta.partitions)]
        found = consumer.offsets_for_times(wanted, timeout=_META_TIMEOUT_S)
        # -1: nothing published since then: start at the end.
        return [
            TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
            for tp in found
        ]

    def _read(self, consumer: Consumer) -> list[Chunk]:
        chunks = []
        for msg in consumer.consume(_BATCH, _POLL_S):
            if msg.error() is not None:
                log.warning("stream feed error error=%s", msg.error())
                continue
            headers: Any = msg.headers()  # a list of (key, value) from confluent-kafka
            try:
                chunks.append(decode_chunk(headers, msg.value()))
            except (PermanentError, KeyError, TypeError) as exc:
                log.warning(
                    "not a chunk; skipped partition=%s offset=%s error=%s",
                    msg.partition(),
                    msg.offset(),
                    exc,
                )
        return chunks
