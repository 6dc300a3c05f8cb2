"""The event catalog: which CloudEvents type travels on which topics with which data schema.

`schemas/catalog.json` is the single source; topic apply, the codec and every stage read it
through `Catalog`. Topic names get the deployment's prefix (`CONVEYOR_TOPIC_PREFIX`) in front,
which lets tests and tenants share one cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from conveyor.events.avro import schema_urn
from conveyor.paths import schemas_dir

STATUS_TOPIC = "conveyor.task.status"
STATUS_TYPE = "conveyor.task.status.v1"
INGRESS_TOPIC = "conveyor.task.submitted"
INGRESS_TYPE = "conveyor.task.submitted.v1"
# The pipeline's event types, named once for code (a unit test holds them to catalog.json).
PREPROCESSED_TYPE = "conveyor.task.preprocessed.v1"
INFERRED_TYPE = "conveyor.task.inferred.v1"
MODERATED_TYPE = "conveyor.task.moderated.v1"
STORED_TYPE = "conveyor.task.stored.v1"
NOTIFIED_TYPE = "conveyor.task.notified.v1"
LANES = ("high", "normal", "low")  # priority lanes, highest first


@dataclass(frozen=True, slots=True)
class EventSpec:
    type: str
    topics: tuple[str, ...]
    schema: str
    version: int
    producer: str
    consumers: tuple[str, ...]
    ingress: bool

    @property
    def dataschema(self) -> str:
        return schema_urn(self.schema, self.version)


@dataclass(frozen=True, slots=True)
class Catalog:
    events: tuple[EventSpec, ...]
    stages: tuple[str, ...]
    partitions: int
    named_types: tuple[str, ...]

    def spec(self, event_type: str) -> EventSpec | None:
        for spec in self.events:
            if spec.type == event_type:
                return spec
        return None

    def consumed_by(self, stage: str) -> tuple[EventSpec, ...]:
        return tuple(spec for spec in self.events if stage in spec.consumers)

    def stage_topics(self) -> tuple[str, ...]:
        """Every topic the pipeline's events travel on, in catalog order."""
        return tuple(topic for spec in self.events for topic in spec.topics)

    def lane_topic(self, event_type: str, lane: str) -> str:
        """The topic of priority `lane` (one of `LANES`) for a type published on lanes: the
        one of its topics named `<topic>.<lane>`; KeyError when it has no such lane."""
        spec = self.spec(event_type)
        for topic in spec.topics if spec is not None and len(spec.topics) > 1 else ():
            if topic.rsplit(".", 1)[-1] == lane:
                return topic
        raise KeyError(f"{event_type} has no priority lane {lane!r}")

    def retry_topic(self, stage: str, rung: int) -> str:
        return f"conveyor.{stage}.retry.{rung}"

    def dlq_topic(self, stage: str) -> str:
        return f"conveyor.{stage}.dlq"


@cache
def load_catalog(directory: Path | None = None) -> Catalog:
    raw = json.loads(((directory or schemas_dir()) / "catalog.json").read_text())
    events = tuple(
        EventSpec(
            type=e["type"],
            topics=tuple(e["topics"]),
            schema=e["schema"],
            version=int(e["version"]),
            producer=e["producer"],
            consumers=tuple(e["consumers"]),
            ingress=bool(e.get("ingress", False)),
        )
        for e in raw["events"]
    )
    return Catalog(
        events=events,
        stages=tuple(raw["stages"]),
        partitions=int(raw["partitions"]),
        named_types=tuple(raw.get("named_types", ())),
    )
