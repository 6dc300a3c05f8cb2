"""Entry point: `python -m conveyor.services.inference` (or `conveyor run inference`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from conveyor.events.payloads import TaskPreprocessed
from conveyor.runtime.entry import main
from conveyor.runtime.typed import TypedService, payload_of
from conveyor.services.inference.handler import InferenceResources, handle_batch
from conveyor.services.inference.settings import InferenceSettings
from conveyor.telemetry.gpu import start_gpu_sampler

if TYPE_CHECKING:
    from conveyor.ml.capacity import CapacityController
    from conveyor.ml.registry import ModelRegistry
    from conveyor.reuse import ReuseCache
    from conveyor.streaming.publisher import ChunkPublisher

log = logging.getLogger(__name__)


def setup(settings: InferenceSettings) -> InferenceResources:
    from conveyor.ml.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings.models, settings.models_file)
    if settings.preload:
        for spec in registry.specs:
            registry.for_kind(spec.kind, spec.name)
            log.info("model loaded kind=%s name=%s source=%s", spec.kind, spec.name, spec.source)
    # conveyor_gpu_* on /metrics while CUDA is present; None (no thread) on a CPU machine.
    return InferenceResources(
        models=registry,
        gpu_sampler=start_gpu_sampler("inference"),
        capacity=_capacity(settings),
        reuse=_reuse(settings),
        streams=_streams(settings, registry),
    )


def _reuse(settings: InferenceSettings) -> ReuseCache | None:
    """The result reuse cache on the result store, or None when reuse is off."""
    if not settings.reuse:
        return None
    from conveyor.reuse import ReuseCache
    from conveyor.store import open_store

    log.info("result reuse on ttl_s=%s lease_s=%s", settings.reuse_ttl_s, settings.reuse_lease_s)
    return ReuseCache(open_store(settings.store_url), settings, rungs=len(settings.retry_delays))


def _streams(settings: InferenceSettings, registry: ModelRegistry) -> ChunkPublisher | None:
    """The chunk publisher of streaming tasks (docs/streaming.md), or None when streaming is off."""
    if not settings.stream_enabled:
        return None
    from conveyor.ml.policy import build_signals
    from conveyor.streaming.publisher import ChunkPublisher

    signals = build_signals(settings, lambda: registry.for_kind("embed"))
    return ChunkPublisher.open_kafka(settings, signals, settings.thresholds, settings.chunk_rules())


def _capacity(settings: InferenceSettings) -> CapacityController | None:
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


def teardown(resources: InferenceResources) -> None:
    if resources.gpu_sampler is not None:
        resources.gpu_sampler.stop()
    if resources.reuse is not None:
        resources.reuse.store.close()
    if resources.streams is not None:
        resources.streams.close()


INFERENCE = TypedService(
    "inference",
    InferenceSettings,
    payload=payload_of(TaskPreprocessed),
    setup=setup,
    handle_batch=handle_batch,
    teardown=teardown,
)
SERVICE = INFERENCE.service()

if __name__ == "__main__":
    main(SERVICE)
