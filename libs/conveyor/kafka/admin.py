"""Topic creation: make the topics a plan names, idempotently.

What the plan holds (the catalog's topics, retry ladders, dead letters, the redrive ledger) is
decided above this layer, in `conveyor.topology`; this module only talks to the cluster.
Existing topics are left alone (partition counts are never lowered); missing ones are created,
and a topic a concurrent caller created first counts as existing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from conveyor.errors import BrokerError
from conveyor.kafka.config import admin as admin_conf
from conveyor.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TopicPlan:
    name: str  # the full name, prefix included
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def create_topics(
    settings: KafkaSettings,
    plans: Sequence[TopicPlan],
    *,
    replication: int = -1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the planned topics that are missing; return the names created, sorted.
    `replication=-1` = the broker's default."""
    client = AdminClient(admin_conf(settings))
    existing = set(client.list_topics(timeout=timeout_s).topics)
    missing = [p for p in plans if p.name not in existing]
    if not missing:
        return []
    futures = client.create_topics(
        [NewTopic(p.name, p.partitions, replication, config=p.config) for p in missing],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent apply won
                raise BrokerError(f"creating topic {name} failed: {exc}") from exc
    log.info("topics applied created=%d existing=%d", len(created), len(plans) - len(missing))
    return sorted(created)
