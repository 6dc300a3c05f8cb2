"""gateway settings (`CONVEYOR_*`): where it listens, the tenants' tokens, store, estimates.

The templates and models it checks tasks against (`CONVEYOR_TEMPLATES`, `CONVEYOR_MODELS`) are
`CatalogSettings`, shared with preprocess: give the gateway the same values as the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from conveyor.settings import CatalogSettings, KafkaSettings, store_url_field
from conveyor.streaming.settings import StreamFollowSettings
from conveyor.webhooks.policy import parse_allow


class GatewaySettings(KafkaSettings, CatalogSettings, StreamFollowSettings):
    gateway_host: str = Field(default="127.0.0.1", description="bind address of the HTTP API")
    gateway_port: int = Field(
        default=8080, ge=0, le=65535, description="HTTP port; 0 picks a free one"
    )
    gateway_tokens: dict[SecretStr, str] = Field(
        default_factory=dict,
        repr=False,
        description="bearer tokens, JSON object {token: tenant}; no tokens: every call is 401",
    )
    store_url: SecretStr = store_url_field()
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        description="base of the `status_url` and `Location` answers, e.g. "
        "https://conveyor.example.com; unset: they are relative paths (/v1/tasks/<id>). Never "
        "taken from the request's Host header, which the client controls",
    )
    # A client sending its body a byte at a time must not hold a connection for ever; 10 s is
    # ample for a 1 MB body on any working link.
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="the whole request body must arrive within this"
    )
    preprocess_group: str | None = Field(
        default=None,
        description="consumer group whose lag estimates the queue; default the "
        "preprocess stage's (<prefix>conveyor.preprocess)",
    )
    # A POST answers only once the broker holds the task; 5 s covers a leader election.
    publish_timeout_s: float = Field(
        default=5.0, gt=0, description="wait for the broker's ack per POST"
    )
    # Lag is a few broker round trips: refreshed at most this often, whatever the request rate.
    lag_cache_s: float = Field(default=5.0, gt=0, description="queue estimate refresh interval")
    lag_timeout_s: float = Field(default=2.0, gt=0, description="timeout of one lag probe")
    # 250 ms: status changes reach the socket promptly; one indexed read per socket per tick.
    ws_poll_s: float = Field(default=0.25, gt=0, description="WebSocket: store poll interval")
    ws_max_s: float = Field(default=3600.0, gt=0, description="WebSocket: longest a socket lives")
    ws_max_connections: int = Field(default=1000, ge=1, description="WebSockets per process")
    # One tenant opening sockets in a loop must not take every slot of the process.
    ws_max_per_tenant: int = Field(
        default=100, ge=1, description="WebSockets per tenant per process"
    )
    recent_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="the trace id of a task published here is shown this long, until the "
        "pipeline records it in the store (the reservation has none)",
    )
    recent_max: int = Field(default=100_000, ge=1, description="tasks remembered as submitted")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="larger POSTs get 413")
    # A batch file: 50,000 requests is the OpenAI Batch API's limit too; 64 MiB holds that many
    # short tasks, and the file is held in memory while it is checked.
    batch_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="larger batch files get 413"
    )
    batch_max_tasks: int = Field(default=50_000, ge=1, description="requests per batch file")
    batch_body_timeout_s: float = Field(
        default=300.0, gt=0, description="the whole batch file must arrive within this"
    )
    # A batch nobody reads is ended this long after its window at worst.
    batch_sweep_s: float = Field(
        default=30.0, gt=0, description="how often batches past their window are ended"
    )
    # Paced dispatch (docs/batches.md): enough batch tasks in flight to keep every stage busy
    # (inference takes 32 at a time; several stages hold a batch each, and a slot frees only
    # once writeback has recorded the task's end), few enough that an interactive task queues
    # behind at most this many batch records anywhere. 512: measured, bench/results/batches.md.
    batch_in_flight: int = Field(
        default=512,
        ge=0,
        description="batch tasks dispatched and unfinished at once, over all batches and "
        "replicas sharing the store; 0: no bound (every task published at once)",
    )
    batch_dispatch_poll_s: float = Field(
        default=0.2, gt=0, description="how often the batch dispatcher looks for free room"
    )
    access_log: bool = Field(
        default=False,
        description="uvicorn's access log too (the app already logs each request by route "
        "template); credentials in any line are masked either way",
    )
    metrics_host: str = Field(default="127.0.0.1", description="bind address of metrics_port")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        description="also serve /metrics /healthz /readyz on this port (as "
        "the stages do); unset: only on the HTTP port",
    )
    health_stall_s: float = Field(default=10.0, gt=0, description="/healthz fails on a stall")
    # The same setting as notify's: give both the same value, or the gateway refuses at submit
    # time a receiver notify would call.
    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="networks (CIDR) and host names webhooks may reach although internal; "
        "the gateway refuses other internal address literals and localhost in callback_url",
    )

    @property
    def lag_group(self) -> str:
        return self.preprocess_group or self.stage_group("preprocess")

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _allow_list(cls, value: Any) -> Any:
        return parse_allow(value)

    @field_validator("public_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("gateway_tokens", mode="before")
    @classmethod
    def _token_map(cls, value: Any) -> dict[SecretStr, str]:
        # Checked here, with messages that name no part of the value: pydantic's own errors
        # would put a bad entry's key, the token, in their location.
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("gateway_tokens is not valid JSON") from None
        if not isinstance(value, Mapping) or not all(
            isinstance(token, str | SecretStr) and isinstance(tenant, str)
            for token, tenant in value.items()
        ):
            raise ValueError("gateway_tokens must be a JSON object {token: tenant} of strings")
        return {SecretStr(t) if isinstance(t, str) else t: tenant for t, tenant in value.items()}
