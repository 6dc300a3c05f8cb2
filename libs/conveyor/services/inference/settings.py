"""inference settings (`CONVEYOR_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from conveyor.reuse import ReuseSettings
from conveyor.settings import StageSettings
from conveyor.streaming.settings import StreamSettings


class InferenceSettings(StageSettings, ReuseSettings, StreamSettings):
    # ReuseSettings: CONVEYOR_REUSE, _REUSE_TTL_S, _REUSE_LEASE_S, _STORE_URL (docs/reuse.md).
    # Dynamic batching: up to 32 records per poll, waiting at most 20 ms for the batch to fill.
    batch_max: int = Field(default=32, ge=1, description="records per batch")
    batch_wait_ms: int = Field(default=20, ge=0, description="max wait to fill a batch")
    priority_lanes: bool = Field(default=True, description="high lane first, then normal, low")
    # Pipelined with fair share (the default): the model works on one batch while the loop
    # reads, emits and commits; each batch is cut from the fair-share window when the model is
    # free for it. A 50 ms-per-32 stand-in model reached 92% of its bare loop this way, the same
    # as the plain loop (93%; bench/inference_modes.py, docs/scheduling.md). Pipelined without
    # fair share (or under exactly-once, where fair share is off) reached 35%, so unless it is
    # set, `pipelined` follows fair share (`_pipelined_with_fair_share`).
    pipelined: bool = Field(
        default=True, description="handler on a worker thread (default: with fair share)"
    )
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

    @model_validator(mode="after")
    def _pipelined_with_fair_share(self) -> InferenceSettings:
        """Unless CONVEYOR_PIPELINED is set, inference is pipelined exactly when fair share is
        in effect (on, and not exactly-once): the plain loop is the faster of the others."""
        if "pipelined" not in self.model_fields_set:
            object.__setattr__(self, "pipelined", self.fair_share and not self.exactly_once)
        return self
