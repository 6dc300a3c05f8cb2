"""What a stage reads: its input topics, priority lanes, retry rungs and the type each carries.

Derived once from the catalog and the settings; the batch step checks records against it and
the loop subscribes to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.events.catalog import Catalog
from conveyor.settings import StageSettings


@dataclass(frozen=True, slots=True)
class StageTopics:
    accepts: frozenset[str]  # event types the stage handles
    inputs: tuple[str, ...]  # input topics, catalog order
    ingress: frozenset[str]  # inputs that may carry JSON (structured-mode) events
    lanes: tuple[str, ...]  # priority lanes of a type published on several topics
    types: dict[str, str]  # input topic -> the one event type it carries
    retries: tuple[str, ...]  # retry rung topics, rung 1 first

    @classmethod
    def of(
        cls, stage: str, accepts: tuple[str, ...], settings: StageSettings, catalog: Catalog
    ) -> StageTopics:
        # A stage that accepts only some of the types routed to it subscribes only to theirs.
        specs = tuple(s for s in catalog.consumed_by(stage) if not accepts or s.type in accepts)
        rungs = len(settings.retry_delays)
        return cls(
            accepts=frozenset(accepts or [s.type for s in specs]),
            inputs=tuple(settings.topic(t) for s in specs for t in s.topics),
            ingress=frozenset(settings.topic(t) for s in specs if s.ingress for t in s.topics),
            # A type published on several topics has priority lanes, in catalog order.
            lanes=tuple(settings.topic(t) for s in specs if len(s.topics) > 1 for t in s.topics),
            # Each input topic carries one event type (the catalog's); anything else is misrouted.
            types={settings.topic(t): s.type for s in specs for t in s.topics},
            retries=tuple(
                settings.topic(catalog.retry_topic(stage, n)) for n in range(1, rungs + 1)
            ),
        )

    @property
    def subscribed(self) -> list[str]:
        return [*self.inputs, *self.retries]
