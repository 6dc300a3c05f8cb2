"""What every benchmark records beside its figures: the machine, the library versions, the load.

A figure means little without the machine it came from, and on a shared machine without the
load average around the run; `cpu_seconds` is the CPU a set of processes has used so far.
"""

from __future__ import annotations

import os
import platform
import time
import timeit
from collections.abc import Iterable
from importlib.metadata import version
from typing import Any

import psutil

PACKAGES = ("confluent-kafka", "opentelemetry-sdk", "fastavro")


def machine(load: tuple[float, ...], *, packages: Iterable[str] = ()) -> dict[str, Any]:
    """The machine now; `load` is `os.getloadavg()` taken when the run began."""
    described: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in (*PACKAGES, *packages):
        described[package.replace("-", "_")] = version(package)
    described["librdkafka"] = __import__("confluent_kafka").libversion()[0]
    described["load_average_at_start"] = [round(x, 2) for x in load]
    described["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # A speed reference for the µs figures: ~10 µs on an idle modern x86 core.
    described["calibration_us_sum_range_1000"] = round(
        timeit.timeit("sum(range(1000))", number=2000) / 2000 * 1e6, 1
    )
    return described


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes (threads included)."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


class CpuProbe:
    """The machine's busy cores over a span, and how many of them this benchmark kept busy.

    On a shared machine, `other_cores` (busy minus ours: other people's work) says how much the
    contenders were crowded; the broker counts as ours only when this run started it.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.busy = _busy_seconds()
        self.ours = cpu_seconds(pids)

    def cores(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-3)
        busy = (_busy_seconds() - self.busy) / elapsed
        ours = (cpu_seconds(self.pids) - self.ours) / elapsed
        return {
            "seconds": round(elapsed, 1),
            "busy_cores": round(busy, 2),
            "benchmark_cores": round(ours, 2),
            "other_cores": round(max(busy - ours, 0.0), 2),
        }


def _busy_seconds() -> float:
    # guest time is already inside user time; steal (the hypervisor's) is not ours to use.
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))
