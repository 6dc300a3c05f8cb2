"""Replay: make a stage process part of its input again, from a time or an offset.

Two modes (`conveyor replay --mode`):
- `reset`: move the stage's consumer group on its input topics to the offsets for `--from`
  (`offsets_for_times` for a time; an offset is clamped to what the partition still holds). Only
  for an INACTIVE group (no members, checked with describe_consumer_groups): a running stage
  would overwrite the reset with its next commit, and the broker itself refuses offset changes
  from outside an active group. The stage re-consumes everything from there on when it starts.
- `republish`: read [from, to) of the stage's input topics (bounded: `to` defaults to the high
  watermarks seen at start) and produce those records again, original key, value and headers,
  into the same topic and partition, plus `conveyor_replayed_from` = `<topic>:<partition>:
  <offset>`, and the CloudEvents `rerun` attribute (`replay <ref>`, `records.mark_rerun`): the
  replay is an explicit operator re-run: the stage's outputs get ids of their own and may replace
  a task's terminal status; the stage may keep running. Every consumer group of those topics
  sees the records again (e.g. writeback also reads inference's input); their unchanged ids keep
  that idempotent.

Retry rungs are not replayed: a replayed record starts from the stage input like a new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from conveyor.dlq.reader import META_TIMEOUT_S, Ranges, offsets_at, open_reader, read_range
from conveyor.dlq.reader import watermarks as read_watermarks
from conveyor.dlq.records import mark_rerun, parse_time, to_ms
from conveyor.dlq.redrive import Pacer
from conveyor.errors import BrokerError, ConveyorError
from conveyor.events.catalog import load_catalog
from conveyor.kafka.config import admin as admin_conf
from conveyor.kafka.config import common
from conveyor.kafka.producer import Acks, KafkaProducer
from conveyor.runtime.deadletter import REPLAYED_FROM
from conveyor.settings import KafkaSettings

log = logging.getLogger(__name__)
# Broker acks for the republished records.
FLUSH_TIMEOUT_S = 60.0


class ReplayError(ConveyorError):
    """A replay that must not run: an active group, an unknown stage, a bad position."""


Position = int | datetime  # an offset (every partition) or a time


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    stage: str
    group: str
    ranges: Ranges  # input partition -> [from, to)

    @property
    def records(self) -> int:
        """Offsets in range (transaction markers included, so an upper bound)."""
        return sum(end - start for start, end in self.ranges.values())


def parse_position(text: str, *, now: datetime | None = None) -> Position:
    """Digits are an offset; anything else a time (RFC 3339 or relative like `1h`)."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    return parse_time(value, now=now or datetime.now(UTC))


def input_topics(settings: KafkaSettings, stage: str) -> list[str]:
    catalog = load_catalog()
    if stage not in catalog.stages:
        raise ReplayError(f"unknown stage {stage!r}; stages: {', '.join(catalog.stages)}")
    return [settings.topic(t) for spec in catalog.consumed_by(stage) for t in spec.topics]


def plan(
    settings: KafkaSettings,
    stage: str,
    start: Position,
    end: Position | None = None,
    *,
    group: str | None = None,
) -> ReplayPlan:
    """Resolve --from/--to into offsets per input partition, against what the topics hold now."""
    topics = input_topics(settings, stage)
    with open_reader(settings) as consumer:
        marks = read_watermarks(consumer, topics)
        if not marks:
            raise ReplayError(f"none of {topics} exists")
        first = _resolve(consumer, marks, start)
        last = (
            _resolve(consumer, marks, end)
            if end is not None
            else {tp: high for tp, (_, high) in marks.items()}
        )
    ranges = {tp: (first[tp], max(first[tp], last[tp])) for tp in marks}
    return ReplayPlan(stage, group or settings.stage_group(stage), ranges)


def _resolve(consumer: Consumer, marks: Ranges, position: Position) -> dict[tuple[str, int], int]:
    if isinstance(position, int):
        return {tp: min(max(position, low), high) for tp, (low, high) in marks.items()}
    return offsets_at(consumer, list(marks), to_ms(position), marks)


def reset(
    settings: KafkaSettings, replay: ReplayPlan, *, dry_run: bool = False
) -> dict[tuple[str, int], int]:
    """Set the (inactive) group's offsets to each range's start; return the committed offsets
    before the reset (-1: none). A dry run checks and reports without changing anything."""
    admin = AdminClient(admin_conf(settings))
    _require_inactive(admin, replay.group)
    before = _committed(admin, replay)
    if dry_run:
        return before
    tps = [TopicPartition(t, p, start) for (t, p), (start, _) in sorted(replay.ranges.items())]
    futures = admin.alter_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(replay.group, tps)], request_timeout=META_TIMEOUT_S
    )
    try:
        result = futures[replay.group].result(timeout=META_TIMEOUT_S)
    except KafkaException as exc:  # the group became active in between, among others
        raise ReplayError(f"offset reset of group {replay.group} refused: {exc}") from exc
    failed = [tp for tp in result.topic_partitions if tp.error is not None]
    if failed:
        raise ReplayError(
            f"offset reset failed for {[(t.topic, t.partition) for t in failed]}: {failed[0].error}"
        )
    log.info("group offsets reset group=%s partitions=%d", replay.group, len(tps))
    return before


def _require_inactive(admin: AdminClient, group: str) -> None:
    future = admin.describe_consumer_groups([group], request_timeout=META_TIMEOUT_S)[group]
    try:
        description = future.result(timeout=META_TIMEOUT_S)
    except KafkaException as exc:
        raise BrokerError(f"describing group {group} failed: {exc}") from exc
    if description.members:
        hosts = sorted({m.host for m in description.members})
        raise ReplayError(
            f"group {group} is active ({len(description.members)} members on "
            f"{', '.join(hosts)}, state {description.state.name}): stop the stage before a "
            f"reset, or use --mode republish"
        )


def _committed(admin: AdminClient, replay: ReplayPlan) -> dict[tuple[str, int], int]:
    tps = [TopicPartition(t, p) for t, p in sorted(replay.ranges)]
    futures = admin.list_consumer_group_offsets(
        [ConsumerGroupTopicPartitions(replay.group, tps)], request_timeout=META_TIMEOUT_S
    )
    result = futures[replay.group].result(timeout=META_TIMEOUT_S)
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions}


def republish(
    settings: KafkaSettings,
    replay: ReplayPlan,
    *,
    rate: float | None = None,
    on_record: Callable[[str, int, int], None] | None = None,
) -> int:
    """Produce the plan's records again into their own topic and partition; return how many."""
    producer = KafkaProducer.open(
        {
            **common(settings),
            "client.id": "conveyor-replay",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.max.bytes": 2_097_152,  # as the stages' producers allow
        },
        delivery_timeout_s=FLUSH_TIMEOUT_S,
    )
    acks = Acks()
    pacer = Pacer(rate)
    count = 0
    with open_reader(settings) as consumer:
        for msg in read_range(consumer, replay.ranges):
            pacer.wait()
            _produce_again(producer, msg, acks)
            count += 1
            if on_record:
                on_record(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0))
    try:
        producer.wait(acks)
    except BrokerError as exc:
        raise BrokerError(f"republish failed: {exc}") from exc
    log.info("replay republished stage=%s records=%d", replay.stage, count)
    return count


def _produce_again(producer: KafkaProducer, msg: Message, acks: Acks) -> None:
    topic, partition = str(msg.topic()), int(msg.partition() or 0)
    origin = f"{topic}:{partition}:{msg.offset()}"
    raw = cast(list[tuple[str, bytes]], msg.headers() or [])
    # The replayed record is an operator re-run of its task: the stage's outputs carry `rerun`.
    marked, value = mark_rerun(
        [h for h in raw if h[0] != REPLAYED_FROM], msg.value() or b"", f"replay {origin}"
    )
    headers: list[tuple[str, str | bytes | None]] = [*marked, (REPLAYED_FROM, origin.encode())]

    # A full local queue is waited out by the producer (bounded by its delivery timeout).
    producer.send(topic, value, msg.key(), headers, partition=partition, acks=acks)
    producer.poll(0)
