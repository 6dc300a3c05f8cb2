"""Zero-shot text classification by embedding similarity: the label nearest in meaning wins.

Each candidate label is turned into a short sentence ("This text is about sports."), embedded
with the same sentence encoder as the text, and scored by cosine similarity to the text. Scores
are a softmax over the similarities divided by a temperature, so they sum to 1 per text and rank
the labels. Be honest about what this is: a semantic nearest-label heuristic, not a trained
classifier and not an entailment (NLI) model. Scores are not calibrated probabilities, and
labels that are vague, negated ("not spam") or close in meaning are separated poorly. It needs
no training data and works with any label names a task sends, which is why it is the default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from conveyor.ml.protocols import TextEmbedder

DEFAULT_TEMPLATE = "This text is about {label}."
# Cosine similarities of a sentence encoder span about 0.1 between a good and a poor label;
# dividing by 0.05 turns that gap into a clear preference (e^2 ~ 7x) without forcing 0/1.
DEFAULT_TEMPERATURE = 0.05
_LABEL_CACHE_LIMIT = 4096  # label sets repeat across tasks; bound the memory they may take


class Classification(NamedTuple):
    """The winning label and every candidate's score (scores sum to 1)."""

    label: str
    scores: dict[str, float]


class Classifier:
    """Zero-shot classifier over any ``TextEmbedder``; label embeddings are cached."""

    def __init__(
        self,
        embedder: TextEmbedder,
        *,
        template: str = DEFAULT_TEMPLATE,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.embedder = embedder
        self.template = template
        self.temperature = temperature
        self._label_vectors: dict[str, list[float]] = {}

    def classify(
        self, texts: Sequence[str], labels_per_text: Sequence[Sequence[str]]
    ) -> list[Classification]:
        """Best label per text among its own candidate labels, in order."""
        if len(texts) != len(labels_per_text):
            raise ValueError(f"{len(texts)} texts but {len(labels_per_text)} label lists")
        for labels in labels_per_text:
            if not labels:
                raise ValueError("every text needs at least one candidate label")
        self._embed_labels({label for labels in labels_per_text for label in labels})
        text_vectors = self.embedder.embed(list(texts))
        return [
            self._score(vector, list(dict.fromkeys(labels)))
            for vector, labels in zip(text_vectors, labels_per_text, strict=True)
        ]

    def _embed_labels(self, labels: set[str]) -> None:
        missing = sorted(labels - self._label_vectors.keys())
        if not missing:
            return
        if len(self._label_vectors) + len(missing) > _LABEL_CACHE_LIMIT:
            self._label_vectors.clear()
            missing = sorted(labels)
        prompts = [self.template.format(label=label) for label in missing]
        vectors = self.embedder.embed(prompts)
        self._label_vectors.update(zip(missing, vectors, strict=True))

    def _score(self, vector: list[float], labels: list[str]) -> Classification:
        sims = [_dot(vector, self._label_vectors[label]) for label in labels]
        probs = _softmax([s / self.temperature for s in sims])
        scores = dict(zip(labels, probs, strict=True))
        return Classification(label=max(scores, key=scores.__getitem__), scores=scores)


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    # Embeddings are unit vectors, so the dot product is the cosine similarity.
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def _softmax(values: list[float]) -> list[float]:
    top = max(values)  # subtract the max: exp() of large logits would overflow
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]
