"""GPU gauges: the sampler copies `gpu_stats()` into conveyor_gpu_*, and a CPU machine runs none."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from prometheus_client import REGISTRY

from conveyor.telemetry.gpu import GpuSampler, start_gpu_sampler


@dataclass(frozen=True)
class FakeGpu:
    index: int
    memory_used_bytes: int
    utilization_percent: float | None


def gauge(name: str, stage: str, device: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"stage": stage, "device": device})


def test_sampler_sets_memory_and_utilisation_per_device() -> None:
    samples = [FakeGpu(0, 3_000_000_000, 42.0), FakeGpu(1, 1_000, None)]
    sampler = GpuSampler("gputest", lambda: samples, interval_s=60)
    assert sampler.sample_once() == 2
    assert gauge("conveyor_gpu_memory_bytes", "gputest", "0") == 3_000_000_000
    assert gauge("conveyor_gpu_utilization_ratio", "gputest", "0") == pytest.approx(0.42)
    assert gauge("conveyor_gpu_memory_bytes", "gputest", "1") == 1_000
    assert gauge("conveyor_gpu_utilization_ratio", "gputest", "1") is None  # no NVML: no series


def test_sampler_swallows_a_failing_stats_call() -> None:
    def broken() -> list[FakeGpu]:
        raise RuntimeError("driver gone")

    assert GpuSampler("gputest-broken", broken).sample_once() == 0


def test_sampler_thread_stops_promptly() -> None:
    sampler = GpuSampler("gputest-thread", lambda: [], interval_s=0.05).start()
    sampler.stop()
    assert not sampler._thread.is_alive()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_no_sampler_and_no_gpu_series_without_cuda() -> None:
    assert start_gpu_sampler("gputest-cpu") is None
    assert gauge("conveyor_gpu_memory_bytes", "gputest-cpu", "0") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_reports_real_device_memory_with_cuda() -> None:
    sampler = start_gpu_sampler("gputest-cuda", interval_s=60)
    assert sampler is not None
    sampler.stop()
    used = gauge("conveyor_gpu_memory_bytes", "gputest-cuda", "0")
    assert used is not None and used > 0
