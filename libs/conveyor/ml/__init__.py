"""Conveyor's model layer: configured models loaded lazily, batched inference, moderation signals.

Entry points: ``registry.ModelRegistry`` (specs from ``CONVEYOR_MODELS``, ``for_kind``,
``count_tokens``), ``generator.GenParams``, ``moderation`` signals, ``batching.run_batched`` and
``device.gpu_stats``. This package is the only place that imports torch and transformers, and
only in the modules that need them: ``registry``, ``sources``, ``protocols``, ``classifier`` and
``moderation`` import without the ML extras. ``python -m conveyor.ml`` prepares the packaged
models (the one-off SmolLM2 conversion) so the first task does not pay for it.

Model hubs are unreachable from Conveyor's machines and a download attempt would hang until its
timeout, so ``HF_HUB_OFFLINE`` is set here, before any submodule can import transformers
(huggingface_hub reads it at import); every load also passes ``local_files_only=True`` in case
transformers was imported earlier by someone else.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
