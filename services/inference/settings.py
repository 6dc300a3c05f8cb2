"""inference settings (`CONVEYOR_*`)."""

from __future__ import annotations

from pydantic import Field

from conveyor.settings import StageSettings


class InferenceSettings(StageSettings):
    # Dynamic batching: up to 32 records per poll, waiting at most 20 ms for the batch to fill.
    batch_max: int = Field(default=32, ge=1, description="records per batch")
    batch_wait_ms: int = Field(default=20, ge=0, description="max wait to fill a batch")
    priority_lanes: bool = Field(default=True, description="high lane first, then normal, low")
    models: str | None = Field(
        default=None, description="model registry JSON; default: packaged models"
    )
    preload: bool = Field(default=True, description="load the configured models at start")
