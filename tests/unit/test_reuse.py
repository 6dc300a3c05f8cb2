"""Result reuse: the key's normalisation (pure), and the inference handler with reuse on, on tiny
real models and a real SQLite store (model calls counted by `conveyor_model_records_total`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from conveyor.errors import RetryableError
from conveyor.events.ingress import parse_task
from conveyor.events.model import RERUN, Event
from conveyor.events.params import InvalidParamsError, parse_params
from conveyor.ml.registry import ModelRegistry, ModelSpec
from conveyor.reuse import REUSED, ReuseCache, ReuseSettings, reuse_key
from conveyor.runtime import Emit
from conveyor.runtime.typed import Context
from conveyor.services.inference.handler import InferenceResources
from conveyor.services.inference.settings import InferenceSettings
from conveyor.store import ResultStore, ReuseClaim, open_store
from conveyor.variants import VARIANT
from tests.stages import infer
from tests.unit.test_inference_isolation import preprocessed
from tests.unit.test_ml_tiny import tiny_dirs  # noqa: F401  (the session's tiny model folders)

pytestmark = pytest.mark.timeout(300)


def data(kind: str = "embed", params: dict[str, str] | None = None, **over: Any) -> dict[str, Any]:
    return {
        "task": {"task_id": "t", "tenant": "acme", "kind": kind, "params": params or {}},
        "input": over.get("input", "hello world"),
        "prompt": over.get("prompt", "Say: hello world"),
        "labels": over.get("labels", []),
    }


def key(kind: str = "embed", params: dict[str, str] | None = None, **over: Any) -> str | None:
    model = over.pop("model", "m")
    variant = over.pop("variant", "")
    return reuse_key(data(kind, params, **over), model=model, variant=variant)


# --- the key -------------------------------------------------------------------------------


def test_same_input_same_key_and_every_output_changing_field_splits_it() -> None:
    base = key()
    assert base is not None and base == key()
    assert key(input="hello there") != base
    assert key(model="other") != base
    assert key(variant="canary") != base
    assert key("classify", labels=["a", "b"]) != base


def test_params_are_compared_by_value_not_spelling() -> None:
    # Avro carries strings; the gateway may send numbers: "7" and 7, "true" and True agree.
    spelled = key("generate", {"do_sample": "true", "seed": "7", "temperature": "0.5"})
    typed = key("generate", {"do_sample": True, "seed": 7, "temperature": 0.5})  # type: ignore[dict-item]
    assert spelled is not None and spelled == typed
    assert key("generate", {"max_new_tokens": "8"}) == key("generate", {"max_new_tokens": 8})  # type: ignore[dict-item]


def test_greedy_generation_ignores_sampling_knobs_and_seed() -> None:
    greedy = key("generate", {"max_new_tokens": "8"})
    assert greedy is not None
    assert key("generate", {"max_new_tokens": "8", "seed": "3", "temperature": "0.2"}) == greedy
    assert key("generate", {"max_new_tokens": "8", "do_sample": "false"}) == greedy
    assert key("generate", {"max_new_tokens": "9"}) != greedy
    assert key("generate", {"max_new_tokens": "8"}, prompt="other") != greedy


def test_seeded_sampling_is_reusable_per_seed_and_unseeded_is_not() -> None:
    seeded = key("generate", {"do_sample": "true", "seed": "1"})
    assert seeded is not None
    assert key("generate", {"do_sample": "true", "seed": "2"}) != seeded
    assert key("generate", {"do_sample": "true", "seed": "1", "top_p": "0.5"}) != seeded
    assert key("generate", {"do_sample": "true"}) is None


def test_cache_false_and_bad_params_opt_out() -> None:
    assert key(params={"cache": "false"}) is None
    assert key(params={"cache": "true"}) == key()  # the default, said out loud
    assert key("generate", {"seed": str(10**30)}) is None  # inference refuses it itself


def test_classify_labels_from_list_or_param_agree() -> None:
    listed = key("classify", labels=["sports", "kafka"])
    assert listed == key("classify", {"labels": "sports, kafka"})
    assert listed != key("classify", labels=["kafka", "sports"])  # order is kept: argmax ties


def test_the_task_param_is_validated_at_the_edge() -> None:
    with pytest.raises(InvalidParamsError, match=r"params\.cache"):
        parse_params("embed", {"cache": "maybe"})
    task = parse_task(
        {
            "task_id": "a",
            "tenant": "acme",
            "kind": "embed",
            "input": "x",
            "params": {"cache": False},
        }
    )
    assert task.params == {"cache": False}


# --- the handler with reuse on ----------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tiny_dirs: dict[str, Path]) -> ModelRegistry:  # noqa: F811
    return ModelRegistry(
        [
            ModelSpec(
                name="tiny-gpt2",
                kind="generate",
                source=str(tiny_dirs["gpt2"]),
                device="cpu",
                max_new_tokens=4,
            ),
            ModelSpec(name="tiny-bert", kind="embed", source=str(tiny_dirs["bert"]), device="cpu"),
        ]
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'reuse.db'}")
    yield opened
    opened.close()


def context(
    registry: ModelRegistry, store: ResultStore
) -> Context[InferenceSettings, InferenceResources]:
    settings = InferenceSettings(stage="inference", reuse=True, retry_delays=[1, 2, 3])
    cache = ReuseCache(store, settings, rungs=3)
    resources = InferenceResources(models=registry, reuse=cache)
    return Context("inference", settings, logging.getLogger("t"), resources)


def model_records(kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "conveyor_model_records_total",
        {
            "stage": "inference",
            "kind": kind,
            "model": "tiny-" + ("bert" if kind == "embed" else "gpt2"),
        },
    )
    return value or 0.0


def task(n: int, text: str, kind: str = "embed", tenant: str = "acme", **over: Any) -> Event:
    event = preprocessed(n, tenant, kind, **over)
    event.data["input"] = text
    event.data["prompt"] = f"say {text}"
    return event


def emitted(outcome: Any) -> dict[str, Any]:
    assert isinstance(outcome, Emit), outcome
    return dict(outcome.data)


def test_repeats_in_a_batch_and_across_batches_run_the_model_once(
    registry: ModelRegistry, store: ResultStore
) -> None:
    ctx = context(registry, store)
    before = model_records("embed")
    first = infer([task(0, "alpha"), task(1, "beta"), task(2, "alpha")], ctx)
    assert model_records("embed") - before == 2  # alpha once, beta once
    a0, b1, a2 = (emitted(o) for o in first)
    assert a0["embedding"] == a2["embedding"] != b1["embedding"]
    assert [a0["task"]["task_id"], a2["task"]["task_id"]] == ["acme-0", "acme-2"]
    assert first[2].extensions == {REUSED: "acme-0", VARIANT: "tiny-bert"}  # type: ignore[union-attr]
    later = infer([task(3, "beta"), task(4, "gamma"), task(5, "alpha", tenant="other")], ctx)
    assert model_records("embed") - before == 4  # gamma, and alpha for another tenant
    b3 = emitted(later[0])
    assert b3["embedding"] == b1["embedding"] and b3["task"]["task_id"] == "acme-3"
    assert later[0].extensions == {REUSED: "acme-1", VARIANT: "tiny-bert"}  # type: ignore[union-attr]
    assert later[2].extensions == {VARIANT: "tiny-bert"}  # type: ignore[union-attr]


def test_opt_outs_run_the_model(registry: ModelRegistry, store: ResultStore) -> None:
    ctx = context(registry, store)
    infer([task(0, "delta")], ctx)
    before_embed, before_gen = model_records("embed"), model_records("generate")
    opted = task(1, "delta", params={"cache": "false"})
    rerun = task(2, "delta")
    rerun = Event(
        **{**{s: getattr(rerun, s) for s in rerun.__slots__}, "extensions": {RERUN: "redrive x"}}
    )  # type: ignore[attr-defined]
    sampled = [task(3 + i, "go", kind="generate", params={"do_sample": "true"}) for i in range(2)]
    greedy = [task(5 + i, "go", kind="generate", params={"max_new_tokens": "3"}) for i in range(2)]
    outcomes = infer([opted, rerun, *sampled, *greedy], ctx)
    assert all(isinstance(o, Emit) for o in outcomes)
    assert model_records("embed") - before_embed == 2
    assert model_records("generate") - before_gen == 3  # two unseeded samples, one greedy
    assert emitted(outcomes[4])["text"] == emitted(outcomes[5])["text"]


def test_identical_task_in_flight_elsewhere_waits_then_runs_on_the_last_rung(
    registry: ModelRegistry, store: ResultStore
) -> None:
    ctx = context(registry, store)
    other = task(9, "epsilon")
    reuse = ctx.resources.reuse
    assert (
        store.reuse_begin(
            [ReuseClaim("acme", reuse_key(other.data, model="tiny-bert") or "", "replica-b-task")],
            lease_s=600,
        )[0].outcome
        == "run"
    )  # another inference replica is running it
    before = model_records("embed")
    waiting = infer([task(10, "epsilon"), task(11, "epsilon")], ctx)
    assert all(isinstance(o, RetryableError) and "replica-b-task" in str(o) for o in waiting)
    assert model_records("embed") == before
    last = task(10, "epsilon")
    last = Event(
        **{**{s: getattr(last, s) for s in last.__slots__}, "extensions": {"attempt": "3"}}
    )  # type: ignore[attr-defined]
    ran = infer([last], ctx)
    assert isinstance(ran[0], Emit) and model_records("embed") == before + 1
    assert reuse is ctx.resources.reuse
    hit = infer([task(12, "epsilon")], ctx)  # its result was stored for the next one
    assert emitted(hit[0])["embedding"] == emitted(ran[0])["embedding"]
    assert model_records("embed") == before + 1


def test_a_store_fault_runs_the_batch_without_reuse(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    broken = open_store(f"sqlite:///{tmp_path / 'gone.db'}")
    ctx = context(registry, broken)
    broken.close()  # every store call now raises
    before = model_records("embed")
    outcomes = infer([task(0, "zeta"), task(1, "zeta")], ctx)
    assert all(isinstance(o, Emit) for o in outcomes)
    assert model_records("embed") - before == 1  # still coalesced within the batch


def test_reuse_ttl_never_outlives_the_tenants_retention() -> None:
    settings = ReuseSettings(reuse_ttl_s=86400, retention_s=3600, tenant_retention_s={"k": 0})
    cache = ReuseCache(None, settings, rungs=3)  # type: ignore[arg-type]
    assert cache._ttl_s("acme") == 3600
    assert cache._ttl_s("k") == 86400  # kept for ever: the TTL alone bounds reuse
