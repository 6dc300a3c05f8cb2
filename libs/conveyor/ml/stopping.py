"""Stopping a generation in progress when its task is cancelled (docs/cancellation.md).

`CancelCriteria` is a transformers `StoppingCriteria`: `generate` calls it after every new
token with the whole batch, and a row it answers True for is finished (its later positions are
padding) while the other rows go on. Each row has a flag, a callable that reads the stage's
cancel watch, which its own thread keeps current while the model runs; so a task cancelled
mid-generation gets at most one more token after its cancel reached the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

Flag = Callable[[], bool]


class CancelCriteria(StoppingCriteria):
    """Per-row cancel flags; `stopped` records which rows it finished, and after how many
    new tokens (`steps`: how often it was called)."""

    def __init__(self, flags: Sequence[Flag | None]) -> None:
        self.flags = list(flags)
        self.stopped: dict[int, int] = {}  # row -> new tokens when it was stopped
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.steps += 1
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, flag in enumerate(self.flags):
            if row in self.stopped:
                done[row] = True
            elif flag is not None and flag():
                self.stopped[row] = self.steps
                done[row] = True
        return done  # type: ignore[return-value]
