"""GPU-aware capacity with a fake device: batch size toward the latency target, capped by the
memory headroom, in-flight work sized from it, at capacity below the headroom, OOM halving."""

from __future__ import annotations

import pytest

from conveyor.ml.capacity import CapacityController, TorchDevice

GIB = 1024**3


class FakeDevice:
    def __init__(self, free: int = 60 * GIB, total: int = 80 * GIB, peak: int | None = None):
        self.free, self.total, self.peak = free, total, peak

    def memory(self) -> tuple[int, int] | None:
        return (self.free, self.total)

    def peak_and_reset(self) -> int | None:
        return self.peak


class NoDevice:
    def memory(self) -> tuple[int, int] | None:
        return None

    def peak_and_reset(self) -> int | None:
        return None


def model_latency(batch: int) -> float:
    return 0.02 + 0.005 * batch  # a fixed cost plus a cost per record


def test_the_batch_grows_toward_the_latency_target_and_settles_under_it() -> None:
    c = CapacityController(NoDevice(), latency_target_s=0.2, max_batch=256, start_batch=4)
    sizes = []
    for _ in range(200):
        size = c.plan().batch_size
        c.observe(size, model_latency(size))
        sizes.append(size)
    settled = sizes[-20:]
    # The target allows (0.2 - 0.02) / 0.005 = 36 records: it settles near, not over by >10%.
    assert all(0.8 * 0.2 <= model_latency(s) <= 1.1 * 0.2 for s in settled), settled
    assert sizes[0] == 4 and max(settled) > 4


def test_a_slow_model_shrinks_the_batch_to_meet_the_target() -> None:
    c = CapacityController(NoDevice(), latency_target_s=0.1, max_batch=128)
    for _ in range(50):
        size = c.plan().batch_size
        c.observe(size, model_latency(size))
    assert model_latency(c.plan().batch_size) <= 0.11


def test_the_batch_never_leaves_its_bounds() -> None:
    c = CapacityController(NoDevice(), latency_target_s=0.001, max_batch=8, min_batch=2)
    for _ in range(20):
        c.observe(c.plan().batch_size, 10.0)
    assert c.plan().batch_size == 2
    fast = CapacityController(NoDevice(), latency_target_s=10.0, max_batch=8, start_batch=1)
    for _ in range(50):
        fast.observe(fast.plan().batch_size, 0.001)
    assert fast.plan().batch_size == 8


def test_memory_headroom_caps_the_batch_and_in_flight_follows_it() -> None:
    device = FakeDevice(free=20 * GIB, total=80 * GIB, peak=1 * GIB)  # 1 GiB over a batch of 64
    c = CapacityController(device, latency_target_s=10.0, max_batch=4096, start_batch=64)
    c.observe(64, 0.01)  # learns 16 MiB per record
    plan = c.plan()
    # 20 GiB free - 8 GiB headroom = 12 GiB spare / 16 MiB = 768 records.
    assert plan.batch_size == 72  # grew by 1/8 (latency far under the target) and fits
    device.free = 9 * GIB  # 1 GiB spare: 64 records
    plan = c.plan()
    assert plan.batch_size == 64 and plan.max_in_flight == 128 and not plan.at_capacity


def test_below_the_headroom_the_device_is_at_capacity() -> None:
    device = FakeDevice(free=7 * GIB, total=80 * GIB)
    c = CapacityController(device, latency_target_s=1.0, max_batch=32)
    assert c.plan().at_capacity
    device.free = 20 * GIB
    assert not c.plan().at_capacity


def test_an_oom_halves_the_size_handed_out() -> None:
    c = CapacityController(NoDevice(), latency_target_s=1.0, max_batch=64)
    c.on_oom()
    c.on_oom()
    assert c.plan().batch_size == 16


def test_a_partial_batch_does_not_move_the_latency_estimate() -> None:
    c = CapacityController(NoDevice(), latency_target_s=0.1, max_batch=32)
    c.observe(3, 5.0)
    assert c.latency_s is None and c.plan().batch_size == 32


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        CapacityController(NoDevice(), latency_target_s=1.0, max_batch=4, min_batch=8)


def test_the_torch_device_reports_nothing_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: covered by the GPU run")
    assert TorchDevice().memory() is None and TorchDevice().peak_and_reset() is None
