"""librdkafka configuration for Conveyor's consumers, producers and admin client.

Every setting that differs from librdkafka's default is here, with the reason.
"""

from __future__ import annotations

from typing import Any

from conveyor.settings import KafkaSettings, StageSettings


def common(settings: KafkaSettings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username or ""
        password = settings.kafka_sasl_password
        conf["sasl.password"] = password.get_secret_value() if password else ""
    if settings.kafka_ssl_ca_location:
        conf["ssl.ca.location"] = settings.kafka_ssl_ca_location
    # Small requests go out at once: with Nagle's algorithm a request written while an earlier
    # one is unacknowledged at the TCP level (a long-polling fetch that the broker holds, whose
    # ACK the broker's kernel delays) waits for that ACK, up to tens of ms per hop.
    conf["socket.nagle.disable"] = True
    conf.update(settings.kafka_extra)
    return conf


def consumer(settings: StageSettings, *, client_id: str) -> dict[str, Any]:
    conf = common(settings)
    conf.update(
        {
            "group.id": settings.group,
            "client.id": client_id,
            # Offsets are committed by the runtime only after the outputs are acknowledged.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A new group starts at the beginning: a task published before the stage first
            # started must still be processed.
            "auto.offset.reset": "earliest",
            # Only committed transactional output is visible (exactly-once stages upstream).
            "isolation.level": "read_committed",
            # The cooperative assignor moves only the partitions that change owner, so a
            # joining instance does not stop every other instance's work.
            "partition.assignment.strategy": "cooperative-sticky",
            # A stage that stops polling for 5 minutes (a stuck model) is presumed dead.
            "max.poll.interval.ms": 300_000,
            # Bound prefetch memory: 16 MiB per consumer is plenty for small task events.
            "queued.max.messages.kbytes": 16_384,
            # A resumed retry partition joins the next fetch request only when the one in
            # flight returns; librdkafka's 500 ms long poll made 1 s retries ~50% late. One
            # poll interval keeps retries due on time; new records still return a fetch at once.
            "fetch.wait.max.ms": min(settings.poll_timeout_ms, 500),
            # Fail fast when a broker disappears so health checks notice.
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 2_000,
        }
    )
    return conf


def producer(
    settings: StageSettings, *, client_id: str, transactional_id: str | None = None
) -> dict[str, Any]:
    conf = common(settings)
    conf.update(
        {
            "client.id": client_id,
            # No duplicates from the producer's own retries, and per-partition order kept.
            "enable.idempotence": True,
            "acks": "all",
            # No linger (default): each hop sends at once, which a five-hop p99 of ~10 ms
            # needs. Batches still form under load: the loop produces a whole poll batch at
            # once while up to five requests are in flight.
            "linger.ms": settings.linger_ms,
            "delivery.timeout.ms": int(settings.delivery_timeout_s * 1000),
            "compression.type": "lz4",
            "message.max.bytes": max(settings.max_record_bytes * 2, 1_048_576),
        }
    )
    if transactional_id:
        conf["transactional.id"] = transactional_id
        # An open transaction of a crashed instance blocks read_committed readers of its
        # partitions until this timeout, unless its restart fences it first by reusing the
        # transactional.id (`StageSettings.instance_slot`, see StageRunner.start).
        conf["transaction.timeout.ms"] = 60_000
    return conf


def admin(settings: KafkaSettings) -> dict[str, Any]:
    return common(settings)
