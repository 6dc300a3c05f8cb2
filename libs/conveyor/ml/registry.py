"""The registry that loads configured models lazily and keeps them loaded.

The specs it loads (``ModelSpec``, ``CONVEYOR_MODELS``) are defined in ``specs``; specs that share
source, device and dtype share one copy of the weights. This module imports neither torch nor
transformers; the model classes are imported on first load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, overload

from conveyor.ml.sources import PACKAGE_PREFIX, SMOLLM2_PACKAGE
from conveyor.ml.specs import (
    KINDS,
    Kind,
    ModelSpec,
    check_unique,
    default_specs,
    load_specs,
    parse_specs,
)

if TYPE_CHECKING:
    from conveyor.ml.classifier import Classifier
    from conveyor.ml.embedder import Embedder
    from conveyor.ml.generator import Generator

# The specs are defined in `specs` (so model classes can name theirs without importing this
# module); they are part of the registry's interface too.
__all__ = [
    "KINDS",
    "Kind",
    "ModelRegistry",
    "ModelSpec",
    "default_specs",
    "load_specs",
    "parse_specs",
]
logger = logging.getLogger(__name__)


class ModelRegistry:
    """Loads each configured model on first use and keeps it; thread-safe."""

    def __init__(self, specs: Iterable[ModelSpec] | None = None) -> None:
        self._specs = tuple(default_specs() if specs is None else specs)
        check_unique(self._specs)
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
        from conveyor.ml.resolve import resolve_source

        return load_tokenizer(resolve_source(spec.source))
