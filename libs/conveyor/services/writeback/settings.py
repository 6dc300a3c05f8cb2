"""writeback settings (`CONVEYOR_*`)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from conveyor.retention import RetentionSettings
from conveyor.settings import StageSettings, store_url_field


class WritebackSettings(StageSettings, RetentionSettings):
    # RetentionSettings: CONVEYOR_RETENTION_S, _TENANT_RETENTION_S, _RETENTION_SWEEP_S ...
    store_url: SecretStr = store_url_field()
    # One store transaction per poll batch: 200 records keep a transaction short.
    batch_max: int = Field(default=200, ge=1, description="records per store transaction")
