"""notify settings (`CONVEYOR_*`): the store, tenants' webhook secrets, the destination policy.

`CONVEYOR_WEBHOOK_SECRETS` maps each tenant to its signing secret(s), as JSON:
`{"acme": "whsec_...", "globex": ["whsec_new...", "whsec_old..."]}` (a list, or one string
with space-separated secrets, while a key is rotated: every one signs). There is no shared
default secret: a task of a tenant without one has its webhook refused (dead-lettered with that
reason), and `CONVEYOR_WEBHOOK_DEFAULT_SECRET` is rejected at start. `CONVEYOR_WEBHOOK_ALLOW`
lists networks and host names the destination policy lets through although they are internal
(a JSON list, or comma-separated: `10.8.0.0/16,hooks.internal`).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from conveyor.settings import StageSettings, store_url_field
from conveyor.webhooks.policy import parse_allow
from conveyor.webhooks.sender import RESOLVE_GRACE_S, batch_bound_s
from conveyor.webhooks.signing import SecretFormatError, secret_key


class NotifySettings(StageSettings):
    # A malformed secret map must not be echoed in the error that reports it: every settings
    # class inherits `hide_input_in_errors` from the shared settings.

    store_url: SecretStr = store_url_field()
    webhook_secrets: dict[str, list[SecretStr]] = Field(
        default_factory=dict,
        description="tenant -> whsec_ secret, or several during a rotation (JSON)",
    )
    webhook_default_secret: SecretStr | None = Field(
        default=None, description="removed: tenants each need their own secret"
    )
    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="networks (CIDR) and host names webhooks may reach although internal",
    )
    # One total deadline per delivery (connect, TLS, send, answer): a receiver slower than
    # this is treated as down, and the ladder tries again later (a receiver that was only slow
    # then sees the webhook twice, with one webhook-id).
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # Only the status matters; a few KiB of the answer are read, never more.
    webhook_max_answer_bytes: int = Field(default=4096, ge=0, le=65536)
    # Deliveries of one batch in flight at once: a slow receiver holds one of these.
    webhook_concurrency: int = Field(default=16, ge=1, le=256)
    webhook_ca_file: str | None = Field(
        default=None, description="CA bundle for https receivers (default: certifi's)"
    )
    # A claim older than this whose sender died is taken over (at-least-once, not lost).
    claim_lease_s: float = Field(default=60.0, gt=0)
    batch_max: int = Field(default=50, ge=1)

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _secret_lists(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {
            tenant: secrets.split() if isinstance(secrets, str) else secrets
            for tenant, secrets in value.items()
        }

    @field_validator("webhook_secrets")
    @classmethod
    def _secrets_usable(cls, value: dict[str, list[SecretStr]]) -> dict[str, list[SecretStr]]:
        for tenant, secrets in value.items():
            if not secrets:
                raise ValueError(f"tenant {tenant!r} has an empty webhook secret list")
            for secret in secrets:
                try:
                    secret_key(secret.get_secret_value())
                except SecretFormatError as exc:
                    raise ValueError(f"webhook secret of tenant {tenant!r}: {exc}") from None
        return value

    @field_validator("webhook_default_secret")
    @classmethod
    def _no_default(cls, value: SecretStr | None) -> None:
        if value is not None:
            raise ValueError(
                "CONVEYOR_WEBHOOK_DEFAULT_SECRET is no longer supported: give each tenant its "
                "own secret in CONVEYOR_WEBHOOK_SECRETS"
            )
        return None

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _allow_list(cls, value: Any) -> Any:
        return parse_allow(value)

    @model_validator(mode="after")
    def _batch_fits_liveness(self) -> NotifySettings:
        # A batch of webhooks takes at most two delivery deadlines (the start window, then the
        # last started delivery's own) plus name-resolution grace; the loop must come round
        # within the liveness stall limit.
        bound = batch_bound_s(self.webhook_timeout_s)
        if bound >= self.health_stall_s:
            raise ValueError(
                f"2 x webhook_timeout_s ({self.webhook_timeout_s:g} s) + {RESOLVE_GRACE_S:g} s "
                f"must stay under health_stall_s ({self.health_stall_s:g} s)"
            )
        return self

    def webhook_keys(self, tenant: str) -> list[bytes]:
        """The tenant's signing keys (several while a key is rotated); empty if it has none."""
        return [secret_key(s.get_secret_value()) for s in self.webhook_secrets.get(tenant, ())]
