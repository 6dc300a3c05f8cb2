"""Sentence embeddings: a transformer encoder, mean pooling over real tokens, L2 normalisation.

This is how sentence-transformers computes all-MiniLM-L6-v2's 384-d vectors, done with plain
transformers so no other library is needed. Because the vectors are unit length, a dot product
is the cosine similarity. Texts are sorted by length before batching so each batch pads to
similar lengths (padding is wasted compute), and results are put back in the caller's order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel

from conveyor.ml.batching import run_batched
from conveyor.ml.device import resolve_device, resolve_dtype
from conveyor.ml.loading import load_model, load_tokenizer, max_input_tokens
from conveyor.ml.resolve import resolve_source
from conveyor.ml.specs import ModelSpec

logger = logging.getLogger(__name__)


class Embedder:
    """A loaded encoder; ``embed`` turns texts into unit vectors of ``dim`` floats."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int, max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_length = max_length  # longer texts are truncated, as in training

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Embedder:
        path = resolve_source(spec.source)
        device = resolve_device(spec.device)
        model = load_model(AutoModel, path, device, resolve_dtype(spec.dtype, device))
        return cls.from_loaded(
            model, load_tokenizer(path), path, max_batch_size=spec.max_batch_size
        )

    @classmethod
    def from_loaded(
        cls, model: Any, tokenizer: Any, path: Path, *, max_batch_size: int
    ) -> Embedder:
        limit = max_input_tokens(path, tokenizer, model.config)
        return cls(model, tokenizer, max_batch_size=max_batch_size, max_length=limit)

    def with_batch_size(self, max_batch_size: int) -> Embedder:
        """A view on the same weights with another batch size."""
        if max_batch_size == self.max_batch_size:
            return self
        return Embedder(
            self.model, self.tokenizer, max_batch_size=max_batch_size, max_length=self.max_length
        )

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None) -> list[list[float]]:
        """One unit vector per text, in order."""
        if not texts:
            return []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        started = time.perf_counter()
        vectors = run_batched(
            self._embed_batch, [texts[i] for i in order], batch_size or self.max_batch_size
        )
        result: list[list[float]] = [[] for _ in texts]
        for position, index in enumerate(order):
            result[index] = vectors[position]
        logger.debug("embedded count=%d seconds=%.3f", len(texts), time.perf_counter() - started)
        return result

    def embed_tensor(self, texts: Sequence[str]) -> torch.Tensor:
        """Like ``embed`` but as a float32 CPU tensor of shape (len(texts), dim)."""
        return torch.tensor(self.embed(texts), dtype=torch.float32).reshape(len(texts), self.dim)

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        pooled = mean_pool(hidden, encoded["attention_mask"])
        return F.normalize(pooled.float(), p=2, dim=-1).cpu().tolist()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors where the mask is 1 (padding must not dilute the mean)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
