"""moderation settings (`CONVEYOR_*`): signal thresholds, blocklist rules, disallowed examples.

The policy's fields (`thresholds`, `rules`, `disallowed_examples`) are `PolicySettings`, shared
with inference, which gates streamed partial text with the same policy (docs/streaming.md).
"""

from __future__ import annotations

from pydantic import Field

from conveyor.ml.policy import DEFAULT_RULES, PolicySettings, Threshold
from conveyor.settings import StageSettings

__all__ = ["DEFAULT_RULES", "ModerationSettings", "Threshold"]


class ModerationSettings(StageSettings, PolicySettings):
    models: str | None = Field(default=None, description="model registry JSON (for the embedder)")
    batch_max: int = Field(default=64, ge=1)
