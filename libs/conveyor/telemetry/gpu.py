"""GPU memory and utilisation on `/metrics`: a daemon thread samples `gpu_stats()` periodically.

The inference service starts it in its setup. On a machine without CUDA nothing starts and no
`conveyor_gpu_*` series appears, so a CPU deployment pays nothing. Sampling runs off the stage
loop (a CUDA query can take milliseconds) and never raises into the pipeline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from conveyor.telemetry.metrics import GPU_MEMORY, GPU_UTILISATION

log = logging.getLogger(__name__)
# Prometheus scrapes every 15-30 s; a 5 s sample keeps the gauges fresh at negligible cost.
SAMPLE_INTERVAL_S = 5.0


class GpuSample(Protocol):
    """What `conveyor.ml.device.GpuStats` provides (a Protocol keeps torch out of this module)."""

    @property
    def index(self) -> int: ...
    @property
    def memory_used_bytes(self) -> int: ...
    @property
    def utilization_percent(self) -> float | None: ...


class GpuSampler:
    """Copies each device's memory in use and utilisation into the `conveyor_gpu_*` gauges."""

    def __init__(
        self,
        stage: str,
        stats: Callable[[], Sequence[GpuSample]],
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self.stage = stage
        self.stats = stats
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def sample_once(self) -> int:
        """Update the gauges from one sample; returns how many devices were seen."""
        try:
            samples = self.stats()
            for gpu in samples:
                device = str(gpu.index)
                GPU_MEMORY.labels(self.stage, device).set(gpu.memory_used_bytes)
                if gpu.utilization_percent is not None:
                    GPU_UTILISATION.labels(self.stage, device).set(gpu.utilization_percent / 100)
            return len(samples)
        except Exception:  # telemetry must not fail the pipeline
            log.warning("gpu sample failed stage=%s", self.stage, exc_info=True)
            return 0

    def start(self) -> GpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()


def start_gpu_sampler(stage: str, *, interval_s: float = SAMPLE_INTERVAL_S) -> GpuSampler | None:
    """A started sampler when CUDA is present (gauges set at once), else None."""
    try:
        import torch

        from conveyor.ml.device import gpu_stats

        if not torch.cuda.is_available():
            return None
    except Exception:
        log.warning("gpu metrics unavailable stage=%s", stage, exc_info=True)
        return None
    sampler = GpuSampler(stage, gpu_stats, interval_s=interval_s)
    sampler.sample_once()
    log.info("gpu metrics sampling stage=%s interval_s=%s", stage, interval_s)
    return sampler.start()
