"""Entry point: `python -m conveyor.services.moderation` (or `conveyor run moderation`)."""

from __future__ import annotations

from typing import Any

from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from conveyor.services.moderation.handler import handle_batch
from conveyor.services.moderation.settings import ModerationSettings


def setup(settings: ModerationSettings) -> dict[str, Any]:
    from conveyor.ml.policy import build_signals

    return {"signals": build_signals(settings, lambda: _embedder(settings))}


def _embedder(settings: ModerationSettings) -> Any:
    from conveyor.ml.registry import ModelRegistry

    return ModelRegistry.from_json(settings.models).for_kind("embed")


SERVICE = StageService("moderation", ModerationSettings, handle_batch=handle_batch, setup=setup)

if __name__ == "__main__":
    main(SERVICE)
