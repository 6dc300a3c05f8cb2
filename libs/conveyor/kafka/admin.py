"""Topic apply: create every topic the catalog and the retry ladders name, idempotently.

Run by `conveyor topics apply`, by the Helm hook Job and by the local demo. Existing topics are
left alone (partition counts are never lowered); missing ones are created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from conveyor.cancel.topic import CANCEL_CONFIG, CANCEL_TOPIC
from conveyor.dlq.ledger import LEDGER_CONFIG, LEDGER_TOPIC
from conveyor.errors import BrokerError
from conveyor.events.catalog import Catalog, load_catalog
from conveyor.kafka.config import admin as admin_conf
from conveyor.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TopicPlan:
    name: str
    partitions: int
    config: dict[str, str]


def planned_topics(
    catalog: Catalog, *, prefix: str = "", rungs: int = 3, partitions: int | None = None
) -> list[TopicPlan]:
    parts = partitions or catalog.partitions
    names = list(catalog.stage_topics())
    for stage in catalog.stages:
        names += [catalog.retry_topic(stage, n) for n in range(1, rungs + 1)]
        names.append(catalog.dlq_topic(stage))
    # Dead letters are kept for 14 days so operators can inspect and redrive them.
    dlq = {"retention.ms": str(14 * 24 * 3600 * 1000)}
    plans = [
        TopicPlan(prefix + name, parts, dlq if name.endswith(".dlq") else {}) for name in names
    ]
    # The redrive ledger: one partition, so one transactional writer orders every entry.
    plans.append(TopicPlan(prefix + LEDGER_TOPIC, 1, dict(LEDGER_CONFIG)))
    # Cancelled tasks: one partition, compacted, read in full by every stage replica.
    plans.append(TopicPlan(prefix + CANCEL_TOPIC, 1, dict(CANCEL_CONFIG)))
    return plans


def apply_topics(
    settings: KafkaSettings,
    *,
    rungs: int = 3,
    partitions: int | None = None,
    replication: int = -1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing topics; return the names created. `replication=-1` = broker default."""
    client = AdminClient(admin_conf(settings))
    plan = planned_topics(
        load_catalog(), prefix=settings.topic_prefix, rungs=rungs, partitions=partitions
    )
    existing = set(client.list_topics(timeout=timeout_s).topics)
    missing = [p for p in plan if p.name not in existing]
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
    log.info("topics applied created=%d existing=%d", len(created), len(plan) - len(missing))
    return sorted(created)
