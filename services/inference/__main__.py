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

    registry = ModelRegistry.from_json(settings.models)
    if settings.preload:
        for spec in registry.specs:
            registry.for_kind(spec.kind, spec.name)
            log.info("model loaded kind=%s name=%s source=%s", spec.kind, spec.name, spec.source)
    # conveyor_gpu_* on /metrics while CUDA is present; None (no thread) on a CPU machine.
    return {"models": registry, "gpu_sampler": start_gpu_sampler("inference")}


def teardown(resources: dict[str, Any]) -> None:
    if resources.get("gpu_sampler") is not None:
        resources["gpu_sampler"].stop()


SERVICE = StageService(
    "inference", InferenceSettings, handle_batch=handle_batch, setup=setup, teardown=teardown
)

if __name__ == "__main__":
    main(SERVICE)
