"""One tenant's task never fails another's: the real inference handler on tiny real models.

A batch of 32 tasks from eight tenants (generate greedy, sampled and seeded; embed; classify)
gets one poisoned task mixed in: the 32 complete, the poisoned one fails alone with a reason
that names its problem. The poisons are the ones seen in production: a seed torch refuses
(caught by the typed params, even when an older edge let it through) and a model group whose
call raises. The model layer's own isolation is proven with the seed reaching torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from conveyor.errors import PermanentError
from conveyor.events.model import Event
from conveyor.ml.generator import GenParams
from conveyor.ml.registry import ModelRegistry, ModelSpec
from conveyor.runtime import Emit
from conveyor.runtime.typed import Context
from conveyor.services.inference.handler import InferenceResources
from conveyor.services.inference.settings import InferenceSettings
from tests.stages import infer
from tests.unit.test_ml_tiny import tiny_dirs  # noqa: F401  (the session's tiny model folders)

pytestmark = pytest.mark.timeout(300)

SEED_OVERFLOW = str(10**30)  # what `{"seed": 1e30}` became before the edge checked it
PARAM_SETS: list[dict[str, str]] = [
    {},
    {"max_new_tokens": "3"},
    {"do_sample": "true", "temperature": "0.7"},
    {"do_sample": "true", "seed": "11", "max_new_tokens": "4"},
    {"do_sample": "true", "top_p": "0.9", "temperature": "1.3"},
]


@pytest.fixture(scope="module")
def registry(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:  # noqa: F811
    empty = tmp_path_factory.mktemp("not-a-model")  # loading it raises: a broken model group
    return ModelRegistry(
        [
            ModelSpec(
                name="tiny-gpt2",
                kind="generate",
                source=str(tiny_dirs["gpt2"]),
                device="cpu",
                max_batch_size=8,
                max_new_tokens=5,
            ),
            ModelSpec(name="broken", kind="generate", source=str(empty), device="cpu"),
            ModelSpec(name="tiny-bert", kind="embed", source=str(tiny_dirs["bert"]), device="cpu"),
            ModelSpec(
                name="tiny-bert", kind="classify", source=str(tiny_dirs["bert"]), device="cpu"
            ),
        ]
    )


def preprocessed(n: int, tenant: str, kind: str, **over: Any) -> Event:
    task_id = f"{tenant}-{n}"
    task = {
        "task_id": task_id,
        "tenant": tenant,
        "kind": kind,
        "priority": "normal",
        "callback_url": None,
        "deadline": None,
        "submitted_at": "2026-11-23T00:00:00+00:00",
        "model": None,
        "params": {},
        **over,
    }
    data = {
        "task": task,
        "input": f"kafka topics carry events {n}",
        "prompt": f"tell me about kafka {n}",
        "token_count": 5,
        "labels": ["sports", "kafka"] if kind == "classify" else [],
    }
    return Event(
        id=f"id-{task_id}",
        type="conveyor.task.preprocessed.v1",
        source="/test",
        subject=task_id,
        data=data,
        extensions={"tenant": tenant},
    )


def thirty_two_tasks() -> list[Event]:
    events = []
    for n in range(32):
        tenant = f"tenant{n % 8}"
        kind = ("generate", "generate", "embed", "classify")[n % 4]
        params = PARAM_SETS[n % len(PARAM_SETS)] if kind == "generate" else {}
        events.append(preprocessed(n, tenant, kind, params=params))
    return events


POISONS = {
    "seed past torch's range": (
        {"kind": "generate", "params": {"do_sample": "true", "seed": SEED_OVERFLOW}},
        "params.seed",
    ),
    "temperature that is not finite": (
        {"kind": "generate", "params": {"do_sample": "true", "temperature": "inf"}},
        "params.temperature",
    ),
    "model whose call raises": ({"kind": "generate", "model": "broken"}, ""),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_one_poisoned_task_fails_alone_and_the_other_32_complete(
    registry: ModelRegistry, poison: str
) -> None:
    over, reason = POISONS[poison]
    events = thirty_two_tasks()
    events.insert(13, preprocessed(99, "mallory", **over))
    context = Context(
        "inference",
        InferenceSettings(stage="inference"),
        logging.getLogger("t"),
        InferenceResources(models=registry),
    )
    outcomes = infer(events, context)
    assert len(outcomes) == 33
    poisoned = outcomes.pop(13)
    assert isinstance(poisoned, Exception), poisoned
    assert reason in str(poisoned)
    if reason:
        assert isinstance(poisoned, PermanentError)  # refused input: straight to `failed`
    for event, outcome in zip(events[:13] + events[14:], outcomes, strict=True):
        assert isinstance(outcome, Emit), (event.subject, outcome)
        assert outcome.data["task"]["task_id"] == event.subject
        kind = event.data["task"]["kind"]
        key = {"generate": "text", "embed": "embedding", "classify": "label"}[kind]
        assert outcome.data[key] not in (None, "", [])


def test_generator_isolates_a_decoding_group_that_raises(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate", "tiny-gpt2")
    good = [GenParams(), GenParams(do_sample=True, seed=3), GenParams(do_sample=True)]
    # GenParams does not check seeds (the edge does): this one reaches torch.manual_seed.
    bad = GenParams(do_sample=True, seed=10**30)
    out = gen.generate_each(["hi", "hi", "tell me", "hi"], [good[0], good[1], bad, good[2]])
    assert isinstance(out[2], Exception)
    assert all(isinstance(text, str) and text for text in out[:2] + out[3:])
    assert out[1] == gen.generate(["hi"], [good[1]])[0]  # seeded: same text as alone
    with pytest.raises(Exception):  # noqa: B017 - generate keeps raising the group's error
        gen.generate(["hi"], [bad])


class PoisonSensitiveEmbedder:
    """A model whose batch call raises when any text in it is poisoned (as a tokenizer or a
    kernel may on one odd input): the handler must re-run the group record by record."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        if any("poison" in t for t in texts):
            raise RuntimeError("kernel failed on one input")
        return [[1.0] for _ in texts]


class OneModelRegistry:
    def __init__(self, model: PoisonSensitiveEmbedder) -> None:
        self.model = model

    def spec(self, kind: str, name: str | None = None) -> ModelSpec:
        return ModelSpec(name="fake", kind="embed", source="/fake")

    def for_kind(self, kind: str, name: str | None = None) -> PoisonSensitiveEmbedder:
        return self.model


def test_a_model_group_whose_call_raises_is_rerun_record_by_record() -> None:
    model = PoisonSensitiveEmbedder()
    events = [preprocessed(n, f"tenant{n % 4}", "embed") for n in range(8)]
    events[5].data["input"] = "poison"
    context = Context(
        "inference",
        InferenceSettings(stage="inference"),
        logging.getLogger("t"),
        InferenceResources(models=OneModelRegistry(model)),  # type: ignore[arg-type]
    )
    outcomes = infer(events, context)
    assert model.calls == [8] + [1] * 8  # the group, then each record alone
    assert isinstance(outcomes[5], RuntimeError)
    assert all(isinstance(o, Emit) for i, o in enumerate(outcomes) if i != 5)
