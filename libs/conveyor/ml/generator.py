"""Batched text generation with a causal language model (SmolLM2 by default).

Each prompt is wrapped in the model's chat template as one user turn, prompts are left-padded
(a decoder continues from the last position, so padding must sit on the left) and generated
together. Records in one call are grouped by compatible decoding settings:

- greedy records (``do_sample=False``) share one group: deterministic, whatever the batch;
- unseeded sampled records share a group per (temperature, top_p);
- seeded sampled records run alone, under their own seed, so a seed reproduces the same text
  whatever else happened to be in the batch (batch shape changes the random stream).

Within a group, ``max_new_tokens`` differs per record: the group runs to the largest budget and
each record is cut to its own. Decoding is causal, so a record's first N tokens do not depend on
how long generation continued afterwards; the cut is exact, and the cost is only that short
records wait for long ones in their batch. Generation still stops early once every row has
produced EOS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteriaList

from conveyor.events.params import MAX_NEW_TOKENS
from conveyor.ml.batching import run_batched
from conveyor.ml.device import resolve_device, resolve_dtype
from conveyor.ml.loading import load_model, load_tokenizer, max_input_tokens
from conveyor.ml.resolve import resolve_source
from conveyor.ml.specs import ModelSpec
from conveyor.ml.stopping import CancelCriteria, Flag
from conveyor.ml.streamer import RowStreamer, TextSink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenParams:
    """Decoding settings of one record. ``max_new_tokens=None`` takes the model's default."""

    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}]")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True, slots=True)
class _Item:
    index: int  # position in the caller's list
    text: str  # prompt after the chat template
    max_new_tokens: int
    sink: TextSink | None = None  # where its partial text streams to, if it streams


class Generator:
    """A loaded causal LM and its tokenizer; ``generate`` is the whole public surface."""

    def __init__(
        self, model: Any, tokenizer: Any, *, max_batch_size: int, max_new_tokens: int, path: Path
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.default_max_new_tokens = max_new_tokens
        self._context = max_input_tokens(path, tokenizer, model.config)
        self._templated = bool(getattr(tokenizer, "chat_template", None))
        # Over-long prompts lose their start, not the end where the question and the assistant
        # turn sit; the handler should reject those first (count_tokens).
        self.tokenizer.truncation_side = "left"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> Generator:
        path = resolve_source(spec.source)
        device = resolve_device(spec.device)
        model = load_model(AutoModelForCausalLM, path, device, resolve_dtype(spec.dtype, device))
        tokenizer = load_tokenizer(path, padding_side="left")
        return cls(
            model,
            tokenizer,
            max_batch_size=spec.max_batch_size,
            max_new_tokens=spec.max_new_tokens,
            path=path,
        )

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompts: Sequence[str],
        params: Sequence[GenParams],
        *,
        sinks: Mapping[int, TextSink] | None = None,
        cancelled: Sequence[Flag | None] | None = None,
    ) -> list[str]:
        """One completion per prompt, in order. ``params[i]`` applies to ``prompts[i]``;
        ``sinks[i]``, when given, receives prompt i's partial text as it is generated;
        ``cancelled[i]``, when given, is read after every token: once True, that record stops
        (its text is what it had so far).

        Raises the first group's error; ``generate_each`` keeps the other groups' texts.
        """
        outputs = self.generate_each(prompts, params, sinks=sinks, cancelled=cancelled)
        for out in outputs:
            if isinstance(out, Exception):
                raise out
        return [str(out) for out in outputs]

    def generate_each(
        self,
        prompts: Sequence[str],
        params: Sequence[GenParams],
        *,
        sinks: Mapping[int, TextSink] | None = None,
        cancelled: Sequence[Flag | None] | None = None,
    ) -> list[str | Exception]:
        """Like ``generate``, but a decoding group that raises (a seed torch refuses, a
        temperature that turns the distribution into NaN) yields its error for its own records
        only: the other groups' texts are kept, so one task's parameters never fail another's."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} params")
        outputs: list[str | Exception] = [""] * len(prompts)
        for key, group in decoding_groups(params).items():
            try:
                texts = self._generate_group(prompts, params, group, sinks or {}, cancelled)
            except Exception as exc:  # isolated per group, reported per record
                logger.warning(
                    "generation group failed key=%s size=%d error=%r", key, len(group), exc
                )
                texts = {i: exc for i in group}
            for i, text in texts.items():
                outputs[i] = text
        return outputs

    def _generate_group(
        self,
        prompts: Sequence[str],
        params: Sequence[GenParams],
        group: list[int],
        sinks: Mapping[int, TextSink],
        cancelled: Sequence[Flag | None] | None = None,
    ) -> dict[int, str | Exception]:
        # Similar budgets side by side, so a chunk rarely waits on one long record.
        items = sorted(
            (self._item(i, prompts[i], params[i], sinks.get(i)) for i in group),
            key=lambda item: item.max_new_tokens,
        )
        first = params[group[0]]
        run = partial(self._run, params=first, cancelled=cancelled)
        texts = run_batched(run, items, self.max_batch_size)
        return {item.index: text for item, text in zip(items, texts, strict=True)}

    def _item(self, index: int, prompt: str, params: GenParams, sink: TextSink | None) -> _Item:
        budget = params.max_new_tokens or self.default_max_new_tokens
        return _Item(index=index, text=self._render(prompt), max_new_tokens=budget, sink=sink)

    def _render(self, prompt: str) -> str:
        if not self._templated:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def _run(
        self, chunk: list[_Item], params: GenParams, cancelled: Sequence[Flag | None] | None = None
    ) -> list[str]:
        started = time.perf_counter()
        flags = [cancelled[item.index] for item in chunk] if cancelled is not None else []
        if flags and all(flag is not None and flag() for flag in flags):
            return [""] * len(chunk)  # every record cancelled before its chunk started
        budget = max(item.max_new_tokens for item in chunk)
        encoded = self._encode([item.text for item in chunk], budget)
        streamer = self._streamer(chunk)
        extra: dict[str, Any] = {}
        criteria = None
        if any(flags):
            criteria = CancelCriteria(flags)
            extra["stopping_criteria"] = StoppingCriteriaList([criteria])
        with torch.inference_mode(), _seeded(params.seed, self.device):
            out = self.model.generate(
                **encoded,
                generation_config=self._config(params, budget),
                streamer=streamer,
                **extra,
            )
        new_tokens = out[:, encoded["input_ids"].shape[1] :]
        texts = [
            self.tokenizer.decode(row[: item.max_new_tokens], skip_special_tokens=True).strip()
            for row, item in zip(new_tokens, chunk, strict=True)
        ]
        if streamer is not None:  # the last piece is the result itself
            streamer.finish_rows(texts)
        logger.info(
            "generated batch_size=%d max_new_tokens=%d seconds=%.3f stopped_cancelled=%d",
            len(chunk),
            budget,
            time.perf_counter() - started,
            len(criteria.stopped) if criteria is not None else 0,
        )
        return texts

    def _streamer(self, chunk: list[_Item]) -> RowStreamer | None:
        """A streamer for the chunk's streaming rows, or None (then generation is unchanged)."""
        sinks = {row: item.sink for row, item in enumerate(chunk) if item.sink is not None}
        if not sinks:
            return None
        return RowStreamer(self.tokenizer, sinks, [item.max_new_tokens for item in chunk])

    def _encode(self, texts: list[str], budget: int) -> dict[str, torch.Tensor]:
        # The chat template already holds the special tokens; adding them again would double BOS.
        encoded = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max(1, self._context - budget),
            add_special_tokens=not self._templated,
        )
        # Only ids and mask: some tokenizers add token_type_ids, which GPT-style models would
        # embed as an extra (wrong) signal.
        return {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _config(self, params: GenParams, budget: int) -> GenerationConfig:
        sampling = (
            {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.do_sample
            else {"do_sample": False}
        )
        return GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=budget,
            top_k=0 if params.do_sample else None,  # temperature and top_p alone shape sampling
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            **sampling,
        )


def decoding_groups(params: Sequence[GenParams]) -> dict[tuple[Any, ...], list[int]]:
    """Indices of ``params`` grouped by decoding settings that may share one batch."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        if not p.do_sample:
            key: tuple[Any, ...] = ("greedy",)
        elif p.seed is None:
            key = ("sample", p.temperature, p.top_p)
        else:
            key = ("seeded", i)  # alone: its random stream must not depend on its neighbours
        groups.setdefault(key, []).append(i)
    return groups


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block, then restore them: other callers' randomness and
    reproducibility are not disturbed."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
