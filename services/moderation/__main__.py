"""Entry point: `python -m services.moderation` (or `conveyor run moderation`)."""

from __future__ import annotations

from typing import Any

from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from services.moderation.handler import handle_batch
from services.moderation.settings import ModerationSettings


def setup(settings: ModerationSettings) -> dict[str, Any]:
    from conveyor.ml.moderation import (
        BlocklistSignal,
        DisallowedExample,
        EmbeddingSimilaritySignal,
        ProfanitySignal,
    )

    signals: list[Any] = [ProfanitySignal(), BlocklistSignal.from_config(settings.rules)]
    if settings.disallowed_examples:
        from conveyor.ml.registry import ModelRegistry

        embedder = ModelRegistry.from_json(settings.models).for_kind("embed")
        examples = [DisallowedExample(**e) for e in settings.disallowed_examples]
        signals.append(EmbeddingSimilaritySignal(embedder, examples))
    return {"signals": signals}


SERVICE = StageService("moderation", ModerationSettings, handle_batch=handle_batch, setup=setup)

if __name__ == "__main__":
    main(SERVICE)
