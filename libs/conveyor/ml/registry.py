"""Model specs from configuration, and the registry that loads them lazily and keeps them loaded.

A ``ModelSpec`` names a model for one task kind (``generate``, ``embed``, ``classify``); the
inference settings carry a JSON list of them in ``CONVEYOR_MODELS``. The same name may appear
once per kind (``minilm`` embeds and classifies), and specs that share source, device and dtype
share one copy of the weights. This module imports neither torch nor transformers, so settings
can parse and validate specs anywhere; the model classes are imported on first load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from conveyor.ml.sources import MINILM_PACKAGE, PACKAGE_PREFIX, SMOLLM2_PACKAGE, check_source

if TYPE_CHECKING:
    from conveyor.ml.classifier import Classifier
    from conveyor.ml.embedder import Embedder
    from conveyor.ml.generator import Generator

logger = logging.getLogger(__name__)

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
    _check_unique(specs)
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


def _check_unique(specs: Iterable[ModelSpec]) -> None:
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


class ModelRegistry:
    """Loads each configured model on first use and keeps it; thread-safe."""

    def __init__(self, specs: Iterable[ModelSpec] | None = None) -> None:
        self._specs = tuple(default_specs() if specs is None else specs)
        _check_unique(self._specs)
        self._loaded: dict[tuple[str, str], Any] = {}
        # Embed and classify specs on the same source, device and dtype share one copy of weights.
        self._embedders: dict[tuple[str, str, str], Embedder] = {}
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.RLock()  # one load at a time: loads are memory-heavy

    @classmethod
    def from_json(cls, text: str | None) -> ModelRegistry:
        """Registry for a ``CONVEYOR_MODELS`` value; the defaults when it is unset or blank."""
        return cls(parse_specs(text) if text and text.strip() else None)

    @classmethod
    def from_settings(cls, models: str | None, models_file: str | None) -> ModelRegistry:
        """Registry for the ``models`` / ``models_file`` settings (see ``load_specs``)."""
        return cls(load_specs(models, models_file))

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        return self._specs

    def spec(self, kind: Kind, name: str | None = None) -> ModelSpec:
        """The spec for ``kind`` named ``name``, or the first of that kind that is not a shadow
        (a shadow only ever gets copies of tasks)."""
        for spec in self._specs:
            if spec.kind == kind and (spec.name == name if name else spec.shadow == 0):
                return spec
        raise KeyError(f"no model {name!r} of kind {kind!r} is configured")

    @overload
    def for_kind(self, kind: Literal["generate"], name: str | None = None) -> Generator: ...
    @overload
    def for_kind(self, kind: Literal["embed"], name: str | None = None) -> Embedder: ...
    @overload
    def for_kind(self, kind: Literal["classify"], name: str | None = None) -> Classifier: ...

    def for_kind(self, kind: Kind, name: str | None = None) -> Generator | Embedder | Classifier:
        """The loaded model for ``kind``/``name``, loading it on first use."""
        spec = self.spec(kind, name)
        key = (spec.kind, spec.name)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._load(spec)
            return self._loaded[key]  # type: ignore[no-any-return]

    def loaded(self) -> list[tuple[str, str]]:
        """(kind, name) of every model loaded so far."""
        with self._lock:
            return list(self._loaded)

    def count_tokens(self, name: str, text: str) -> int:
        """Tokens in ``text`` under model ``name``'s own tokenizer (loaded without weights)."""
        with self._lock:
            tokenizer = self._tokenizers.get(name)
            if tokenizer is None:
                tokenizer = self._tokenizers[name] = self._load_tokenizer(name)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _load(self, spec: ModelSpec) -> Any:
        logger.info("loading model name=%s kind=%s source=%s", spec.name, spec.kind, spec.source)
        if spec.kind == "generate":
            from conveyor.ml.generator import Generator

            return Generator.from_spec(spec)
        embedder = self._embedder(spec).with_batch_size(spec.max_batch_size)
        if spec.kind == "embed":
            return embedder
        from conveyor.ml.classifier import Classifier

        return Classifier(embedder)

    def _embedder(self, spec: ModelSpec) -> Embedder:
        from conveyor.ml.embedder import Embedder

        key = (spec.source, spec.device, spec.dtype)
        if key not in self._embedders:
            self._embedders[key] = Embedder.from_spec(spec)
        return self._embedders[key]

    def _load_tokenizer(self, name: str) -> Any:
        spec = next((s for s in self._specs if s.name == name), None)
        if spec is None:
            raise KeyError(f"no model named {name!r} is configured")
        if spec.source == PACKAGE_PREFIX + SMOLLM2_PACKAGE:
            from conveyor.ml import smollm2  # avoids the one-off GGUF conversion

            return smollm2.load_tokenizer()
        from conveyor.ml.loading import load_tokenizer
        from conveyor.ml.sources import resolve_source

        return load_tokenizer(resolve_source(spec.source))
