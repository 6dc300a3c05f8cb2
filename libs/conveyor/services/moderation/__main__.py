"""Entry point: `python -m conveyor.services.moderation` (or `conveyor run moderation`)."""

from __future__ import annotations

from conveyor.events.payloads import TaskInferred
from conveyor.ml.protocols import TextEmbedder
from conveyor.runtime.entry import main
from conveyor.runtime.typed import TypedService, payload_of
from conveyor.services.moderation.handler import ModerationResources, handle_batch
from conveyor.services.moderation.settings import ModerationSettings


def setup(settings: ModerationSettings) -> ModerationResources:
    from conveyor.ml.policy import build_signals

    return ModerationResources(signals=build_signals(settings, lambda: _embedder(settings)))


def _embedder(settings: ModerationSettings) -> TextEmbedder:
    from conveyor.ml.registry import ModelRegistry

    embedder: TextEmbedder = ModelRegistry.from_json(settings.models).for_kind("embed")
    return embedder


MODERATION = TypedService(
    "moderation",
    ModerationSettings,
    payload=payload_of(TaskInferred),
    setup=setup,
    handle_batch=handle_batch,
)
SERVICE = MODERATION.service()

if __name__ == "__main__":
    main(SERVICE)
