"""preprocess settings (`CONVEYOR_*`). Templates and models (`CatalogSettings`) are shared with
the gateway and `conveyor submit`, which refuse an unknown one before it reaches Kafka."""

from __future__ import annotations

from pydantic import Field

from conveyor.settings import DEFAULT_TEMPLATES, CatalogSettings, StageSettings

__all__ = ["DEFAULT_TEMPLATES", "PreprocessSettings"]


class PreprocessSettings(StageSettings, CatalogSettings):
    max_input_chars: int = Field(default=20_000, ge=1, description="longer input is rejected")
    max_input_tokens: int = Field(
        default=512, ge=1, description="token limit of the templated prompt"
    )
    tokenizers: bool = Field(
        default=True,
        description="count tokens with the models' tokenizers (False: whitespace words)",
    )
