"""Entry point: `python -m services.preprocess` (or `conveyor run preprocess`)."""

from __future__ import annotations

from typing import Any

from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from services.preprocess.handler import handle, word_count
from services.preprocess.settings import PreprocessSettings


def setup(settings: PreprocessSettings) -> dict[str, Any]:
    rules = settings.task_rules()
    if not settings.tokenizers:
        return {"count_tokens": word_count, "rules": rules}
    from conveyor.ml.registry import ModelRegistry

    registry = ModelRegistry.from_json(settings.models)

    def count_tokens(kind: str, text: str) -> int:
        return registry.count_tokens(registry.spec(kind).name, text)  # type: ignore[arg-type]

    return {"count_tokens": count_tokens, "rules": rules}


SERVICE = StageService("preprocess", PreprocessSettings, handle=handle, setup=setup)

if __name__ == "__main__":
    main(SERVICE)
