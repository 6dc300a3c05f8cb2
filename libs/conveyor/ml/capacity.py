"""GPU-aware capacity: how many records the inference stage runs per batch and keeps in flight.

`CapacityController` adapts the batch size toward a latency target from measured batch
latencies (multiplicative decrease when a batch runs over the target, additive increase while
well under it, so a noisy measurement does not make it oscillate), caps it by the device's
memory headroom (bytes per record learnt from the memory a batch used), sizes the in-flight work
as `depth` batches, and says when the device is at capacity (free memory under the headroom):
the stage then stops reading until it is not. CUDA OOM halving stays in `ml/batching.py`; an
OOM seen here halves the size the controller hands out too, so the next batch starts smaller.

The device is a small protocol (`Device`): `TorchDevice` reads CUDA's free/total memory and peak
allocation; unit tests pass a fake one. Without CUDA, memory is unknown and only latency sizes
the batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

# Weight of a new measurement in the moving averages.
_EWMA = 0.3


class Device(Protocol):
    def memory(self) -> tuple[int, int] | None:
        """(free bytes, total bytes) of the device; None when unknown (CPU)."""

    def peak_and_reset(self) -> int | None:
        """Peak bytes allocated since the last call (then reset); None when unknown."""


class TorchDevice:
    def __init__(self, index: int = 0) -> None:
        self.index = index

    def memory(self) -> tuple[int, int] | None:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(self.index)
        return int(free), int(total)

    def peak_and_reset(self) -> int | None:
        import torch

        if not torch.cuda.is_available():
            return None
        peak = int(torch.cuda.max_memory_allocated(self.index))
        torch.cuda.reset_peak_memory_stats(self.index)
        return peak


@dataclass(frozen=True, slots=True)
class Plan:
    batch_size: int
    max_in_flight: int
    at_capacity: bool  # free memory under the headroom: stop reading


class CapacityController:
    def __init__(
        self,
        device: Device,
        *,
        latency_target_s: float,
        max_batch: int,
        min_batch: int = 1,
        start_batch: int | None = None,
        headroom: float = 0.1,
        depth: int = 2,
    ) -> None:
        if not 0 < min_batch <= max_batch:
            raise ValueError("need 0 < min_batch <= max_batch")
        self.device = device
        self.latency_target_s = latency_target_s
        self.min_batch = min_batch
        self.max_batch = max_batch
        self.headroom = headroom  # fraction of device memory kept free
        self.depth = depth
        self.batch_size = start_batch or max_batch
        self.latency_s: float | None = None  # moving average of a full batch's latency
        self.bytes_per_record: float | None = None
        self._lock = threading.Lock()  # observe() on the handler's thread, plan() on the loop's

    def observe(self, records: int, seconds: float) -> None:
        """A batch of `records` ran in `seconds`: adapt the batch size."""
        if records <= 0:
            return
        peak = self.device.peak_and_reset()
        with self._lock:
            if peak is not None:
                per = peak / records
                old = self.bytes_per_record
                self.bytes_per_record = per if old is None else old + _EWMA * (per - old)
            if records < self.batch_size:
                return  # a partial batch says little about a full one's latency
            old_latency = self.latency_s
            self.latency_s = (
                seconds if old_latency is None else old_latency + _EWMA * (seconds - old_latency)
            )
            if self.latency_s > self.latency_target_s * 1.1:
                self.batch_size = max(self.min_batch, self.batch_size * 3 // 4)
            elif self.latency_s < self.latency_target_s * 0.8:
                self.batch_size = min(
                    self.max_batch, self.batch_size + max(1, self.batch_size // 8)
                )

    def on_oom(self) -> None:
        with self._lock:
            self.batch_size = max(self.min_batch, self.batch_size // 2)

    def plan(self) -> Plan:
        memory = self.device.memory()
        with self._lock:
            size = self.batch_size
            at_capacity = False
            if memory is not None:
                free, total = memory
                spare = free - self.headroom * total
                at_capacity = spare <= 0
                if self.bytes_per_record and spare > 0:
                    size = min(size, max(self.min_batch, int(spare / self.bytes_per_record)))
            return Plan(size, size * self.depth, at_capacity)
