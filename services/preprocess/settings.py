"""preprocess settings (`CONVEYOR_*`)."""

from __future__ import annotations

from pydantic import Field

from conveyor.settings import StageSettings

DEFAULT_TEMPLATES = {
    "plain": "{input}",
    "summarize": "Summarize the following text in one sentence.\n\n{input}",
    "answer": "Answer the question briefly and factually.\n\nQuestion: {input}",
    "translate-fr": "Translate into French:\n\n{input}",
}


class PreprocessSettings(StageSettings):
    max_input_chars: int = Field(default=20_000, ge=1, description="longer input is rejected")
    max_input_tokens: int = Field(
        default=512, ge=1, description="token limit of the templated prompt"
    )
    templates: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TEMPLATES),
        description="template id -> text with an {input} placeholder (JSON)",
    )
    default_template: str = "plain"
    models: str | None = Field(default=None, description="model registry JSON (CONVEYOR_MODELS)")
    tokenizers: bool = Field(
        default=True,
        description="count tokens with the models' tokenizers (False: whitespace words)",
    )
