"""moderation settings (`CONVEYOR_*`): signal thresholds, blocklist rules, disallowed examples."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from conveyor.settings import StageSettings


class Threshold(BaseModel):
    flag: float = Field(ge=0, le=1)
    block: float = Field(ge=0, le=1)


# A rule's score sets what it does under the blocklist thresholds below: 1.0 blocks, 0.6 flags.
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


class ModerationSettings(StageSettings):
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {
            # alt-profanity-check's SVM puts clear profanity above 0.9 and clean text below 0.2.
            "profanity": Threshold(flag=0.5, block=0.8),
            "blocklist": Threshold(flag=0.5, block=0.9),
            "embedding_similarity": Threshold(flag=0.6, block=0.8),
        },
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
    models: str | None = Field(default=None, description="model registry JSON (for the embedder)")
    batch_max: int = Field(default=64, ge=1)
