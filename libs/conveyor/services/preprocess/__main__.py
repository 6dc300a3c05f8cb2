"""Entry point: `python -m conveyor.services.preprocess` (or `conveyor run preprocess`)."""

from __future__ import annotations

from conveyor.runtime.entry import main
from conveyor.runtime.typed import TypedService, raw_data
from conveyor.services.preprocess.handler import PreprocessResources, handle, word_count
from conveyor.services.preprocess.settings import PreprocessSettings


def setup(settings: PreprocessSettings) -> PreprocessResources:
    from conveyor.variants.source import VariantSource

    rules = settings.task_rules()
    # Routing to variants happens here, so the variant travels in the event from preprocess on
    # and a retry or replay of any later stage keeps it (docs/variants.md).
    variants = VariantSource(settings.models, settings.models_file)
    if not settings.tokenizers:
        return PreprocessResources(count_tokens=word_count, rules=rules, variants=variants)
    from conveyor.ml.registry import ModelRegistry

    registry = ModelRegistry.from_settings(settings.models, settings.models_file)

    def count_tokens(kind: str, text: str) -> int:
        return registry.count_tokens(registry.spec(kind).name, text)  # type: ignore[arg-type]

    return PreprocessResources(count_tokens=count_tokens, rules=rules, variants=variants)


PREPROCESS = TypedService(
    "preprocess", PreprocessSettings, payload=raw_data, setup=setup, handle=handle
)
SERVICE = PREPROCESS.service()

if __name__ == "__main__":
    main(SERVICE)
