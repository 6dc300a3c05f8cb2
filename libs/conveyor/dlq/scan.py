"""Reading dead letters: every DLQ topic of one stage or all, filtered, with redrive state.

A scan reads each DLQ topic from its low to its high watermark as observed at the start (DLQs
are small: dead letters are kept 14 days), keeps the records the filter matches, and reads the
redrive ledger so callers can tell which were already redriven.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Consumer

from conveyor.dlq.ledger import redriven_refs
from conveyor.dlq.reader import read_range, watermarks
from conveyor.dlq.records import DeadLetter, DeadLetterFilter
from conveyor.events.catalog import load_catalog
from conveyor.settings import KafkaSettings


class UnknownStageError(ValueError):
    """A --stage the catalog does not name."""


@dataclass(frozen=True, slots=True)
class Scan:
    letters: list[DeadLetter]
    redriven: set[str]  # refs of dead letters already redriven (any, not only `letters`)


def dlq_topics(settings: KafkaSettings, stage: str | None) -> list[str]:
    catalog = load_catalog()
    if stage is not None and stage not in catalog.stages:
        raise UnknownStageError(f"unknown stage {stage!r}; stages: {', '.join(catalog.stages)}")
    stages = [stage] if stage else list(catalog.stages)
    return [settings.topic(catalog.dlq_topic(s)) for s in stages]


def scan(consumer: Consumer, settings: KafkaSettings, flt: DeadLetterFilter) -> Scan:
    """The matching dead letters in (topic, partition, offset) order, and the ledger's refs."""
    marks = watermarks(consumer, dlq_topics(settings, flt.stage))
    letters = [dl for dl in map(DeadLetter.of, read_range(consumer, marks)) if flt.matches(dl)]
    letters.sort(key=lambda dl: (dl.topic, dl.partition, dl.offset))
    return Scan(letters, redriven_refs(consumer, settings))


def parse_ref(ref: str, settings: KafkaSettings) -> tuple[str, int, int]:
    """`<stage or dlq topic>:<partition>:<offset>` -> (dlq topic, partition, offset)."""
    head, sep, rest = ref.rpartition(":")
    topic, sep2, partition = head.rpartition(":")
    if not (sep and sep2 and partition.isdigit() and rest.isdigit()):
        raise ValueError(f"{ref!r} is not <stage|dlq topic>:<partition>:<offset>")
    if topic in load_catalog().stages:
        topic = dlq_topics(settings, topic)[0]
    return topic, int(partition), int(rest)


def find(consumer: Consumer, ref: tuple[str, int, int]) -> DeadLetter | None:
    """One dead letter by its coordinates, or None if it is not (or no longer) there."""
    topic, partition, offset = ref
    marks = watermarks(consumer, [topic])
    low, high = marks.get((topic, partition), (0, 0))
    if not low <= offset < high:
        return None
    found = list(read_range(consumer, {(topic, partition): (offset, offset + 1)}))
    return DeadLetter.of(found[0]) if found else None
