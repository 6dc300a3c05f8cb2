"""Broker availability as the clients see it: librdkafka's `error_cb` and commit results.

librdkafka reports `_ALL_BROKERS_DOWN` through `error_cb` when it has lost its connection to
every broker; it reports no matching "back up" event, so any evidence of a live broker (a
delivery acknowledged, a commit answered, a lag probe answered) marks the cluster reachable
again. `available()` is False once every broker has been down for longer than `down_limit_s`:
a stage's `/healthz` uses it, so an idle stage whose cluster is gone is restarted, while a short
broker restart (shorter than the limit) is ridden out by librdkafka's own reconnects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

log = logging.getLogger(__name__)


class BrokerAvailability:
    """Thread-safe enough: plain attribute writes, read by the health server's thread."""

    def __init__(self, down_limit_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.down_limit_s = down_limit_s
        self.clock = clock
        self.down_since: float | None = None
        self.commit_failures = 0

    def available(self) -> bool:
        down = self.down_since
        return down is None or self.clock() - down <= self.down_limit_s

    def up(self) -> None:
        if self.down_since is not None:
            log.info("kafka brokers reachable again")
            self.down_since = None

    def down(self) -> None:
        if self.down_since is None:
            log.warning("every kafka broker is down")
            self.down_since = self.clock()

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's `error_cb`: global client errors (never a single record's)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.down()
        elif err.fatal():
            log.error("kafka client fatal error error=%s", err)
        else:
            log.debug("kafka client error error=%s", err)

    def on_commit(self, err: KafkaError | None, partitions: list[Any]) -> None:
        """librdkafka's `on_commit`: the result of an (asynchronous) offset commit."""
        if err is None or err.code() == KafkaError._NO_OFFSET:
            self.up()
            return
        # Not fatal: the next commit carries later offsets of the same partitions, and an
        # uncommitted batch is redelivered (at-least-once), never lost.
        self.commit_failures += 1
        log.warning("offset commit failed error=%s partitions=%d", err, len(partitions))

    def callbacks(self) -> dict[str, Any]:
        """The librdkafka configuration entries that route client events here."""
        return {"error_cb": self.on_error}
