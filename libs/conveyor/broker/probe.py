"""Readiness probing of a Kafka broker: does a real request round-trip?

"The port accepts connections" is not "the broker is ready": the KRaft broker opens its client
listener only after it has caught up with the metadata log and been unfenced, and a metadata
request that lists at least one broker proves exactly that. The probe client retries connections
quickly and keeps librdkafka's connection-refused noise at DEBUG while the JVM is still starting.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

logger = logging.getLogger(__name__)


class _QuietLog:
    """librdkafka log sink: expected connection errors during start-up go to DEBUG."""

    def log(self, level: int, msg: str, *args: object) -> None:
        logger.debug("probe client log " + msg, *args)


def _on_error(err: KafkaError) -> None:
    logger.debug("probe client error=%s", err)


def probe_client(bootstrap: str) -> AdminClient:
    """An AdminClient tuned for probing a broker that may not be listening yet."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        # librdkafka backs off reconnects up to 10 s by default; while the JVM opens its listener
        # we want a retry every 50-200 ms so readiness is seen within a fraction of a second.
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 200,
        "logger": _QuietLog(),
        "error_cb": _on_error,
    }
    return AdminClient(config)


def answers(admin: AdminClient, timeout: float) -> bool:
    """True when a metadata request returns at least one broker within `timeout` seconds."""
    try:
        return bool(admin.list_topics(timeout=timeout).brokers)
    except KafkaException as exc:
        logger.debug("kafka broker not answering yet error=%s", exc)
        return False
