"""The moderation policy: signal thresholds, blocklist rules, and how scores become a verdict.

One place for the policy, because two stages apply it: moderation decides each finished task's
verdict, and inference gates the partial text it streams (`conveyor.streaming`), so a deployment
configures its thresholds and rules once (`CONVEYOR_THRESHOLDS`, `CONVEYOR_RULES`,
`CONVEYOR_DISALLOWED_EXAMPLES`) and both stages read the same values. The signals themselves
live in `conveyor.ml.moderation`; this module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings

from conveyor.ml.protocols import TextEmbedder
from conveyor.settings import SETTINGS_CONFIG

LEVELS = ("allow", "flag", "block")


class Threshold(BaseModel):
    flag: float = Field(ge=0, le=1)
    block: float = Field(ge=0, le=1)


def default_thresholds() -> dict[str, Threshold]:
    return {
        # alt-profanity-check's SVM puts clear profanity above 0.9 and clean text below 0.2.
        "profanity": Threshold(flag=0.5, block=0.8),
        "blocklist": Threshold(flag=0.5, block=0.9),
        "embedding_similarity": Threshold(flag=0.6, block=0.8),
    }


# A rule's score sets what it does under the blocklist thresholds above: 1.0 blocks, 0.6 flags.
DEFAULT_RULES: list[dict[str, Any]] = [
    {
        "pattern": r"\b(kill|murder|shoot|stab)\s+(you|him|her|them|everyone)\b",
        "regex": True,
        "reason": "threat of violence",
        "score": 1.0,
    },
    {
        "pattern": r"\b\d{3}-\d{2}-\d{4}\b",
        "regex": True,
        "reason": "looks like a US SSN",
        "score": 0.6,
    },
    {
        "pattern": r"\b(?:\d[ -]?){13,16}\b",
        "regex": True,
        "reason": "looks like a card number",
        "score": 0.6,
    },
]


class PolicySettings(BaseSettings):
    """The policy's knobs, shared by every stage that moderates (`CONVEYOR_*`)."""

    model_config = SETTINGS_CONFIG

    thresholds: dict[str, Threshold] = Field(
        default_factory=default_thresholds,
        description="signal name -> flag/block thresholds (JSON)",
    )
    rules: list[dict[str, Any]] = Field(
        default_factory=lambda: list(DEFAULT_RULES),
        description='blocklist rules, JSON: [{"pattern", "reason", "regex", "score"}]',
    )
    disallowed_examples: list[dict[str, str]] = Field(
        default_factory=list,
        description='[{"text", "reason"}] for the embedding-similarity signal; empty = off',
    )


@dataclass(frozen=True, slots=True)
class Verdict:
    verdict: str
    scores: dict[str, float]
    reasons: list[str]


def decide(scores: dict[str, tuple[float, str]], thresholds: dict[str, Threshold]) -> Verdict:
    """The verdict for per-signal (score, reason) pairs; signals without thresholds only report."""
    level = 0
    reasons: list[str] = []
    for name, (score, reason) in sorted(scores.items()):
        limit = thresholds.get(name)
        if limit is None:
            continue
        if score >= limit.block:
            level = 2
            reasons.append(f"{name}: {reason}")
        elif score >= limit.flag:
            level = max(level, 1)
            reasons.append(f"{name}: {reason}")
    rounded = {name: round(score, 4) for name, (score, _) in scores.items()}
    return Verdict(LEVELS[level], rounded, reasons)


def build_signals(policy: PolicySettings, embedder: Callable[[], TextEmbedder]) -> list[Any]:
    """The configured signals: profanity and blocklist always, embedding similarity when
    examples are configured (`embedder` is called only then: it may load a model)."""
    from conveyor.ml.moderation import (
        BlocklistSignal,
        DisallowedExample,
        EmbeddingSimilaritySignal,
        ProfanitySignal,
    )

    signals: list[Any] = [ProfanitySignal(), BlocklistSignal.from_config(policy.rules)]
    if policy.disallowed_examples:
        examples = [DisallowedExample(**e) for e in policy.disallowed_examples]
        signals.append(EmbeddingSimilaritySignal(embedder(), examples))
    return signals


def assess(signals: Sequence[Any], thresholds: dict[str, Threshold], text: str) -> Verdict:
    """The policy's verdict on one text, every signal consulted (the stream gate's check)."""
    scores: dict[str, tuple[float, str]] = {}
    for signal in signals:
        [result] = signal.evaluate([text])
        scores[signal.name] = (result.score, result.reason)
    return decide(scores, thresholds)
