"""Run a batch function over many items in chunks, shrinking the chunk on CUDA out-of-memory.

A batch that fitted yesterday may not fit today (longer inputs, another process on the GPU), so
``run_batched`` halves the chunk size on ``torch.cuda.OutOfMemoryError`` and retries the same
chunk, down to one item. If a single item still does not fit, the work is retryable (memory may
free up, or another replica may have more), so it raises ``RetryableError`` and lets the runtime
decide. The shrunken size is kept for the rest of the call: the next chunk would most likely fail
the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from conveyor.errors import RetryableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def run_batched(fn: Callable[[list[T]], list[R]], items: Sequence[T], max_batch: int) -> list[R]:
    """Apply ``fn`` to ``items`` in chunks of at most ``max_batch``; results keep input order.

    ``fn`` must return exactly one result per item it receives.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    results: list[R] = []
    size = max_batch
    start = 0
    while start < len(items):
        chunk = list(items[start : start + size])
        try:
            out = fn(chunk)
        except torch.cuda.OutOfMemoryError as exc:
            size = _shrink(size, len(chunk), exc)
            continue
        if len(out) != len(chunk):
            raise RuntimeError(f"batch fn returned {len(out)} results for {len(chunk)} items")
        results.extend(out)
        start += len(chunk)
    return results


def _shrink(size: int, chunk_len: int, exc: BaseException) -> int:
    """Next chunk size after an OOM on a chunk of ``chunk_len``; raises when already at one."""
    _free_cached_memory()
    if chunk_len <= 1:
        logger.warning("cuda oom at batch_size=1; giving up")
        raise RetryableError("CUDA out of memory even at batch size 1") from exc
    new_size = max(1, min(size, chunk_len) // 2)
    logger.warning("cuda oom, halving batch batch_size=%d new_batch_size=%d", chunk_len, new_size)
    return new_size


def _free_cached_memory() -> None:
    # Blocks cached by the failed attempt would otherwise make the retry fail too.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
