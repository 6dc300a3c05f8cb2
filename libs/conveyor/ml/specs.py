"""Model specs from configuration: which model serves which task kind, where its files are.

A ``ModelSpec`` names a model for one task kind (``generate``, ``embed``, ``classify``); the
inference settings carry a JSON list of them in ``CONVEYOR_MODELS``. The same name may appear
once per kind (``minilm`` embeds and classifies). This module imports neither torch nor
transformers, so settings can parse and validate specs anywhere, and the model classes can name
their spec without importing the registry that loads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from conveyor.ml.sources import MINILM_PACKAGE, PACKAGE_PREFIX, SMOLLM2_PACKAGE, check_source

Kind = Literal["generate", "embed", "classify"]
KINDS: tuple[Kind, ...] = ("generate", "embed", "classify")
_DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class ModelSpec(BaseModel):
    """One configured model for one task kind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="name tasks refer to")
    kind: Kind = Field(description="task kind this entry serves")
    source: str = Field(description="package:<module> or a local Hugging Face model folder")
    device: str = Field(
        default="auto", pattern=_DEVICE_PATTERN, description="auto = CUDA when present"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto = float32 on CPU, bfloat16 (or float16) on CUDA"
    )
    # 16 prompts keep a 135M model's generate call near a second on two CPU cores; embedding
    # batches are cheap, and 64 is where CPU throughput stops improving (bench/embed_batching).
    max_batch_size: int = Field(default=16, ge=1, le=1024, description="records per forward pass")
    # Waiting longer than a few tens of ms for a fuller batch costs more latency than it saves.
    max_batch_wait_ms: int = Field(default=20, ge=0, le=10_000, description="wait to fill a batch")
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="default generation budget")

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        return check_source(value)


_SPECS = TypeAdapter(list[ModelSpec])


def parse_specs(text: str) -> tuple[ModelSpec, ...]:
    """Specs from a JSON list (the ``CONVEYOR_MODELS`` setting); names unique per kind."""
    specs = tuple(_SPECS.validate_json(text))
    check_unique(specs)
    return specs


def default_specs() -> tuple[ModelSpec, ...]:
    """The models that ship in Conveyor's ML extras: SmolLM2 generates, MiniLM embeds and
    classifies."""
    smollm2 = PACKAGE_PREFIX + SMOLLM2_PACKAGE
    minilm = PACKAGE_PREFIX + MINILM_PACKAGE
    return (
        ModelSpec(name="smollm2", kind="generate", source=smollm2, max_batch_size=16),
        ModelSpec(name="minilm", kind="embed", source=minilm, max_batch_size=64),
        ModelSpec(name="minilm", kind="classify", source=minilm, max_batch_size=64),
    )


def check_unique(specs: Iterable[ModelSpec]) -> None:
    seen: set[tuple[str, str]] = set()
    for spec in specs:
        if (spec.kind, spec.name) in seen:
            raise ValueError(f"model {spec.name!r} is configured twice for kind {spec.kind!r}")
        seen.add((spec.kind, spec.name))
