"""notify settings (`CONVEYOR_*`)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from conveyor.settings import StageSettings, store_url_field


class NotifySettings(StageSettings):
    store_url: SecretStr = store_url_field()
    webhook_secrets: dict[str, str] = Field(
        default_factory=dict, description="tenant -> HMAC secret (JSON)"
    )
    webhook_default_secret: str | None = Field(default=None, description="for tenants not listed")
    # A receiver that takes longer than 10 s is treated as down; the ladder tries again later
    # (a receiver that was only slow then sees the webhook twice, with one event id).
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # A claim older than this whose sender died is taken over (at-least-once, not lost).
    claim_lease_s: float = Field(default=60.0, gt=0)
    batch_max: int = Field(default=50, ge=1)
