"""inference settings (`CONVEYOR_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from conveyor.settings import StageSettings


class InferenceSettings(StageSettings):
    # Dynamic batching: up to 32 records per poll, waiting at most 20 ms for the batch to fill.
    batch_max: int = Field(default=32, ge=1, description="records per batch")
    batch_wait_ms: int = Field(default=20, ge=0, description="max wait to fill a batch")
    priority_lanes: bool = Field(default=True, description="high lane first, then normal, low")
    # Pipelined: the model works on one batch while the loop reads the next and emits and
    # commits the last. Off by default for now: a 50 ms-per-32 stand-in model reached 41% of
    # its bare loop pipelined against 89% in the plain loop (docs/decisions.md), so it stays an
    # opt-in until that gap is closed. Fair share and the quota hold need it.
    pipelined: bool = Field(default=False, description="handler on a worker thread")
    # Fair share: tenants served by deficit round robin within each lane (docs/scheduling.md);
    # in effect when `pipelined` is on.
    fair_share: bool = Field(default=True, description="tenant fair share within each lane")
    quota_hold: bool = Field(default=True, description="hold tenants over their quota")
    max_in_flight: int = Field(default=64, ge=1, description="records read but not handled")
    # GPU-aware capacity (conveyor.ml.capacity): "auto" = on when CUDA is present.
    adaptive_batching: Literal["auto", "on", "off"] = Field(
        default="auto", description="size batches and in-flight work from the device"
    )
    batch_latency_target_ms: float = Field(
        default=250.0, gt=0, description="adaptive batching: target latency of one batch"
    )
    memory_headroom: float = Field(
        default=0.1, ge=0, lt=1, description="adaptive batching: device memory kept free"
    )
    models: str | None = Field(
        default=None, description="model registry JSON; default: packaged models"
    )
    models_file: str | None = Field(
        default=None, description="model registry JSON file, read instead of `models`"
    )
    preload: bool = Field(default=True, description="load the configured models at start")
