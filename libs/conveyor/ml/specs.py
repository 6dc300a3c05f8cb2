"""Model specs from configuration: which model serves which task kind, where its files are.

A ``ModelSpec`` names a model for one task kind (``generate``, ``embed``, ``classify``); the
inference settings carry a JSON list of them in ``CONVEYOR_MODELS``. The same name may appear
once per kind (``minilm`` embeds and classifies). This module imports neither torch nor
transformers, so settings can parse and validate specs anywhere, and the model classes can name
their spec without importing the registry that loads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

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
    # Variant routing (conveyor.variants, docs/variants.md): only these fields change on a reload.
    weight: float | None = Field(
        default=None, ge=0, description="share of the kind's tasks, relative to its siblings"
    )
    tenants: tuple[str, ...] = Field(
        default=(), description="pinned: serves only these tenants (and they only it)"
    )
    shadow: float = Field(
        default=0.0, ge=0, le=1, description="shadow: share of the kind's tasks copied to it"
    )

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        return check_source(value)

    @model_validator(mode="after")
    def _shadow_has_no_weight(self) -> ModelSpec:
        if self.shadow > 0 and self.weight:
            raise ValueError(f"model {self.name!r} is a shadow: it takes no weight")
        return self


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
    primaries: set[str] = set()
    for spec in specs:
        if (spec.kind, spec.name) in seen:
            raise ValueError(f"model {spec.name!r} is configured twice for kind {spec.kind!r}")
        seen.add((spec.kind, spec.name))
        if spec.shadow == 0:
            primaries.add(spec.kind)
    shadow_only = {kind for kind, _ in seen} - primaries
    if shadow_only:
        raise ValueError(f"kinds with only shadow models: {sorted(shadow_only)}")


def load_specs(models: str | None, models_file: str | None = None) -> tuple[ModelSpec, ...]:
    """The configured specs: the file `models_file` when set (`CONVEYOR_MODELS_FILE`, the
    reloadable form), else the JSON `models` (`CONVEYOR_MODELS`), else the packaged defaults."""
    if models_file:
        try:
            text = Path(models_file).read_text()
        except OSError as exc:
            raise ValueError(f"models file {models_file}: {exc.strerror or exc}") from None
        return parse_specs(text)
    return parse_specs(models) if models and models.strip() else default_specs()
