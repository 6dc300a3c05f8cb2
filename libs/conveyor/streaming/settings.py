"""Streaming's settings (`CONVEYOR_*`): mixed into inference's and the gateway's classes.

Inference's mixin extends the moderation policy's (`PolicySettings`): the gate judges partial
text with the same thresholds, rules and examples as the moderation stage, given once.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from conveyor.ml.policy import PolicySettings
from conveyor.settings import SETTINGS_CONFIG
from conveyor.streaming.gate import MAX_INTERVAL_S, MIN_CHARS, ChunkRules


class StreamSettings(PolicySettings):
    """Inference: whether tasks may stream, and how partial text is cut into chunks."""

    stream_enabled: bool = Field(
        default=True,
        description="generate tasks asking `stream: true` push partial text; off: they run "
        "unstreamed (the result is the same)",
    )
    stream_min_chars: int = Field(
        default=MIN_CHARS, ge=1, le=4096, description="new characters per chunk"
    )
    stream_max_interval_ms: float = Field(
        default=MAX_INTERVAL_S * 1000,
        gt=0,
        description="a chunk goes out this long after the last even if shorter",
    )

    def chunk_rules(self) -> ChunkRules:
        return ChunkRules(self.stream_min_chars, self.stream_max_interval_ms / 1000)


class StreamFollowSettings(BaseSettings):
    """Gateway: reading the stream topic and keeping the streams in progress."""

    model_config = SETTINGS_CONFIG

    stream_follow: bool = Field(
        default=True, description="push streamed partial text on task WebSockets"
    )
    # Long enough for a restarted replica to serve streams that began before it started.
    stream_replay_s: float = Field(
        default=120.0, ge=0, description="on start, read chunks published this long ago"
    )
    stream_max_tasks: int = Field(
        default=10_000, ge=1, description="streams kept in memory (the oldest go first)"
    )
    # A generate task's stream matters until its result is stored, seconds to minutes later.
    stream_ttl_s: float = Field(
        default=900.0, gt=0, description="a stream is forgotten this long after its last chunk"
    )
