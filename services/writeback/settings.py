"""writeback settings (`CONVEYOR_*`)."""

from __future__ import annotations

from pydantic import Field

from conveyor.settings import StageSettings, default_store_url


class WritebackSettings(StageSettings):
    store_url: str = Field(default_factory=default_store_url, description="result store URL")
    # One store transaction per poll batch: 200 records keep a transaction short.
    batch_max: int = Field(default=200, ge=1, description="records per store transaction")
