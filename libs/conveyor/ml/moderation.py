"""Moderation signals: each scores texts in [0, 1] and says why. The policy is not here.

The moderation handler combines these scores with its thresholds into allow / flag / block; this
module only measures. Three signals, because each misses what another catches:

- ``ProfanitySignal``: alt-profanity-check's TF-IDF + linear SVM. Fast and mostly lexical, so
  threats without swear words score only mid-range.
- ``BlocklistSignal``: configured words and regular expressions, each with its reason;
  case-insensitive, whole words only, after Unicode NFKC folding so full-width letters and
  ligatures cannot dodge a rule.
- ``EmbeddingSimilaritySignal``: cosine similarity to example phrases of disallowed content, so
  paraphrases of a threat score high without sharing its words. Optional: it needs an embedder.

This module imports neither torch nor scikit-learn at import time.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.ml.protocols import TextEmbedder


@dataclass(frozen=True, slots=True)
class SignalResult:
    """One signal's verdict on one text: ``score`` in [0, 1] and a human-readable reason."""

    signal: str
    score: float
    reason: str


class Signal(Protocol):
    """What the moderation handler calls: one result per text, in order."""

    name: str

    def evaluate(self, texts: Sequence[str]) -> list[SignalResult]: ...


class ProfanitySignal:
    """Probability of offensive language from alt-profanity-check."""

    name = "profanity"

    def __init__(self) -> None:
        # scikit-learn loads in about a second; pay that when the signal is built, not on import.
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def evaluate(self, texts: Sequence[str]) -> list[SignalResult]:
        if not texts:
            return []
        probs = self._predict_prob(list(texts))
        return [self._result(float(p)) for p in probs]

    def _result(self, prob: float) -> SignalResult:
        score = _clamp(prob)
        return SignalResult(self.name, score, f"offensive language probability {score:.2f}")


@dataclass(frozen=True, slots=True)
class BlocklistRule:
    """A word or phrase (``regex=False``, matched as whole words) or a regular expression."""

    pattern: str
    reason: str
    regex: bool = False
    score: float = 1.0

    def compile(self) -> re.Pattern[str]:
        if not 0 <= self.score <= 1:
            raise ValueError(f"rule score must be in [0, 1], got {self.score}")
        body = self.pattern if self.regex else _phrase_pattern(self.pattern)
        # Lookarounds rather than \b: \b fails next to non-word characters ("c++", "@user").
        source = body if self.regex else rf"(?<!\w){body}(?!\w)"
        return re.compile(source, re.IGNORECASE)


def _phrase_pattern(phrase: str) -> str:
    # Any run of whitespace between the words of a phrase matches, so line breaks cannot split it.
    return r"\s+".join(re.escape(word) for word in phrase.split())


class BlocklistSignal:
    """Highest score among matching rules; the reason lists every rule that matched."""

    name = "blocklist"

    def __init__(self, rules: Sequence[BlocklistRule]) -> None:
        self._rules = [(rule, rule.compile()) for rule in rules]

    @classmethod
    def from_config(cls, entries: Sequence[dict[str, Any]]) -> BlocklistSignal:
        """Rules from decoded JSON: ``[{"pattern": ..., "reason": ..., "regex": false}, ...]``."""
        return cls([BlocklistRule(**entry) for entry in entries])

    def evaluate(self, texts: Sequence[str]) -> list[SignalResult]:
        return [self._one(text) for text in texts]

    def _one(self, text: str) -> SignalResult:
        folded = unicodedata.normalize("NFKC", text)
        hits = [rule for rule, pattern in self._rules if pattern.search(folded)]
        if not hits:
            return SignalResult(self.name, 0.0, "no blocklist rule matched")
        reasons = "; ".join(dict.fromkeys(rule.reason for rule in hits))
        return SignalResult(self.name, max(rule.score for rule in hits), reasons)


@dataclass(frozen=True, slots=True)
class DisallowedExample:
    """An example of content to catch, and the reason to give when a text resembles it."""

    text: str
    reason: str


class EmbeddingSimilaritySignal:
    """Cosine similarity of a text to its nearest disallowed example, rescaled to [0, 1].

    Unrelated sentences still have a cosine of 0.0-0.2 under a sentence encoder, so similarity
    at or below ``floor`` scores 0 and the rest is stretched linearly up to 1.
    """

    name = "embedding_similarity"

    def __init__(
        self,
        embedder: TextEmbedder,
        examples: Sequence[DisallowedExample],
        *,
        floor: float = 0.2,
    ) -> None:
        if not examples:
            raise ValueError("EmbeddingSimilaritySignal needs at least one example")
        if not 0 <= floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {floor}")
        self._embedder = embedder
        self._examples = list(examples)
        self._floor = floor
        self._vectors: list[list[float]] | None = None  # embedded on first use

    def evaluate(self, texts: Sequence[str]) -> list[SignalResult]:
        if not texts:
            return []
        if self._vectors is None:
            self._vectors = self._embedder.embed([e.text for e in self._examples])
        vectors = self._vectors
        return [self._one(vector, vectors) for vector in self._embedder.embed(list(texts))]

    def _one(self, vector: list[float], examples: list[list[float]]) -> SignalResult:
        sims = [_dot(vector, example) for example in examples]
        best = max(range(len(sims)), key=sims.__getitem__)
        score = _clamp((sims[best] - self._floor) / (1 - self._floor))
        example = self._examples[best]
        return SignalResult(
            self.name, score, f"{example.reason} (similarity {sims[best]:.2f} to an example)"
        )


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def _clamp(value: float) -> float:
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, value))
