"""The one place that calls transformers' ``from_pretrained``: local files only, chosen device.

Offline by construction: the package sets ``HF_HUB_OFFLINE`` before transformers is imported and
every call here passes ``local_files_only=True``, so a missing file fails at once instead of
hanging on an unreachable model hub.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_tokenizer(path: Path, *, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Tokenizer from a local model folder; gives it a pad token when it has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return prepare_tokenizer(tokenizer, padding_side=padding_side)


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, *, padding_side: str
) -> PreTrainedTokenizerBase:
    # Causal LMs often ship without a pad token; padded positions are masked out, so reusing
    # EOS is harmless and is what the models' own authors do.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(cls: Any, path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained`` from a local folder, moved to ``device`` and set to eval mode."""
    started = time.perf_counter()
    model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    logger.info(
        "model loaded path=%s device=%s dtype=%s seconds=%.2f",
        path,
        device,
        dtype,
        time.perf_counter() - started,
    )
    return model


def max_input_tokens(path: Path, tokenizer: PreTrainedTokenizerBase, config: Any) -> int:
    """Longest input the model should see: sentence-transformers' limit when the folder has one
    (MiniLM was trained on 256 tokens), else the smaller of tokenizer and position limits."""
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        limit = json.loads(st_config.read_text()).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            return limit
    candidates = [
        int(tokenizer.model_max_length),
        int(getattr(config, "max_position_embeddings", 0) or 0),
    ]
    # Tokenizers without a limit report a huge sentinel (1e30); ignore it and absent values.
    sane = [c for c in candidates if 0 < c < 1_000_000]
    return min(sane) if sane else 512
