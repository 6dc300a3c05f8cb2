"""Device and dtype selection for the model layer, plus best-effort GPU statistics.

Configuration names a device as ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or
``cuda:N`` and a dtype as ``auto`` or an explicit name. An explicit CUDA request on a machine
without CUDA is a configuration error and fails loudly rather than silently running on the CPU.
``gpu_stats`` feeds telemetry, so it never raises.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_NAMES = "auto | cpu | cuda | cuda:N"
DTYPE_NAMES = ("auto", *_DTYPES)


def is_valid_device_name(name: str) -> bool:
    """True when ``name`` is a device name ``resolve_device`` understands (no CUDA check)."""
    return bool(_DEVICE_RE.match(name))


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a configured device name into a ``torch.device``.

    Raises ``ValueError`` for an unknown name, or for an explicit CUDA device that is absent.
    """
    if not is_valid_device_name(name):
        raise ValueError(f"unknown device {name!r}; expected {DEVICE_NAMES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but only {torch.cuda.device_count()} exist"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn a configured dtype name into a ``torch.dtype`` suited to ``device``.

    ``auto`` is float32 on the CPU (half precision is slower there, not faster) and bfloat16 on
    CUDA when the GPU supports it (same range as float32, so no overflow), else float16.
    """
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPE_NAMES}") from None


@dataclass(frozen=True, slots=True)
class GpuStats:
    """Memory and utilisation of one CUDA device at one moment."""

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_percent: float | None  # None when NVML is not installed


def gpu_stats() -> list[GpuStats]:
    """Stats for every visible CUDA device; empty on a CPU-only machine. Never raises."""
    try:
        if not torch.cuda.is_available():
            return []
        return [_one_gpu(i) for i in range(torch.cuda.device_count())]
    except Exception:  # telemetry must not fail the pipeline
        logger.warning("gpu stats unavailable", exc_info=True)
        return []


def _one_gpu(index: int) -> GpuStats:
    free, total = torch.cuda.mem_get_info(index)
    return GpuStats(
        index=index,
        name=torch.cuda.get_device_name(index),
        memory_used_bytes=int(total - free),
        memory_total_bytes=int(total),
        utilization_percent=_utilization(index),
    )


def _utilization(index: int) -> float | None:
    # torch.cuda.utilization needs the optional pynvml package; absence is not an error.
    try:
        return float(torch.cuda.utilization(index))
    except Exception:
        return None
