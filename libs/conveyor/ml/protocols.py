"""Structural types at the model layer's seams, importable without torch.

Moderation signals and the classifier need only "something that embeds texts", so tests can pass
a fake and the moderation service can type-check without the ML extras installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class TextEmbedder(Protocol):
    """Turns texts into unit-length vectors, one per text, in order."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...
