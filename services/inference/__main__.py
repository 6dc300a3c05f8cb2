"""Entry point: `python -m services.inference` (or `conveyor run inference`)."""

from __future__ import annotations

import logging
from typing import Any

from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from conveyor.telemetry.gpu import start_gpu_sampler
from services.inference.handler import handle_batch
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


def setup(settings: InferenceSettings) -> dict[str, Any]:
    from conveyor.ml.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings.models, settings.models_file)
    if settings.preload:
        for spec in registry.specs:
            registry.for_kind(spec.kind, spec.name)
            log.info("model loaded kind=%s name=%s source=%s", spec.kind, spec.name, spec.source)
    # conveyor_gpu_* on /metrics while CUDA is present; None (no thread) on a CPU machine.
    return {
        "models": registry,
        "gpu_sampler": start_gpu_sampler("inference"),
        "capacity": _capacity(settings),
    }


def _capacity(settings: InferenceSettings) -> Any:
    """The GPU-aware capacity controller, or None (fixed batch_max / max_in_flight)."""
    import torch

    from conveyor.ml.capacity import CapacityController, TorchDevice

    mode = settings.adaptive_batching
    if mode == "off" or (mode == "auto" and not torch.cuda.is_available()):
        return None
    return CapacityController(
        TorchDevice(),
        latency_target_s=settings.batch_latency_target_ms / 1000,
        max_batch=settings.batch_max,
        headroom=settings.memory_headroom,
    )


def teardown(resources: dict[str, Any]) -> None:
    if resources.get("gpu_sampler") is not None:
        resources["gpu_sampler"].stop()


SERVICE = StageService(
    "inference", InferenceSettings, handle_batch=handle_batch, setup=setup, teardown=teardown
)

if __name__ == "__main__":
    main(SERVICE)
