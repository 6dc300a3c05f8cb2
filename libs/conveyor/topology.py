"""Topic apply: every topic the catalog, the retry ladders and the redrive ledger name.

Run by `conveyor topics apply`, by the Helm hook Job and by the local demo. The plan is made
here, from the catalog and the ledger's settings; `conveyor.kafka.admin` creates what is missing
and leaves existing topics alone.
"""

from __future__ import annotations

from conveyor.cancel.topic import CANCEL_CONFIG, CANCEL_TOPIC
from conveyor.dlq.ledger import LEDGER_CONFIG, LEDGER_TOPIC
from conveyor.events.catalog import Catalog, load_catalog
from conveyor.kafka.admin import TopicPlan, create_topics
from conveyor.settings import KafkaSettings
from conveyor.streaming.chunks import STREAM_TOPIC, STREAM_TOPIC_CONFIG

# Dead letters are kept for 14 days so operators can inspect and redrive them.
DLQ_CONFIG = {"retention.ms": str(14 * 24 * 3600 * 1000)}


def planned_topics(
    catalog: Catalog, *, prefix: str = "", rungs: int = 3, partitions: int | None = None
) -> list[TopicPlan]:
    parts = partitions or catalog.partitions
    names = list(catalog.stage_topics())
    for stage in catalog.stages:
        names += [catalog.retry_topic(stage, n) for n in range(1, rungs + 1)]
        names.append(catalog.dlq_topic(stage))
    plans = [
        TopicPlan(prefix + name, parts, dict(DLQ_CONFIG) if name.endswith(".dlq") else {})
        for name in names
    ]
    # The redrive ledger: one partition, so one transactional writer orders every entry.
    plans.append(TopicPlan(prefix + LEDGER_TOPIC, 1, dict(LEDGER_CONFIG)))
    # Cancelled tasks: one partition, compacted, read in full by every stage replica.
    plans.append(TopicPlan(prefix + CANCEL_TOPIC, 1, dict(CANCEL_CONFIG)))
    # Streamed partial text: short-lived progress, never stored (docs/streaming.md).
    plans.append(TopicPlan(prefix + STREAM_TOPIC, parts, dict(STREAM_TOPIC_CONFIG)))
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
    plan = planned_topics(
        load_catalog(), prefix=settings.topic_prefix, rungs=rungs, partitions=partitions
    )
    return create_topics(settings, plan, replication=replication, timeout_s=timeout_s)
