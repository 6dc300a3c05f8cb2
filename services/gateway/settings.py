"""gateway settings (`CONVEYOR_*`): where it listens, the tenants' tokens, store, estimates."""

from __future__ import annotations

from pydantic import Field

from conveyor.settings import KafkaSettings, default_store_url


class GatewaySettings(KafkaSettings):
    gateway_host: str = Field(default="127.0.0.1", description="bind address of the HTTP API")
    gateway_port: int = Field(
        default=8080, ge=0, le=65535, description="HTTP port; 0 picks a free one"
    )
    gateway_tokens: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="bearer tokens, JSON object {token: tenant}; no tokens: every call is 401",
    )
    store_url: str = Field(default_factory=default_store_url, description="result store URL")
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
    recent_ttl_s: float = Field(
        default=600.0,
        gt=0,
        description="tasks submitted here answer `pending` this long before the store knows them",
    )
    recent_max: int = Field(default=100_000, ge=1, description="tasks remembered as submitted")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="larger POSTs get 413")
    metrics_host: str = Field(default="127.0.0.1", description="bind address of metrics_port")
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        description="also serve /metrics /healthz /readyz on this port (as "
        "the stages do); unset: only on the HTTP port",
    )
    health_stall_s: float = Field(default=10.0, gt=0, description="/healthz fails on a stall")

    @property
    def lag_group(self) -> str:
        return self.preprocess_group or f"{self.topic_prefix}conveyor.preprocess"
