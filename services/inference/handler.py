"""inference's decisions: which model serves a task, how a batch is grouped, what expires.

Failures stay with the records that caused them. A batch is grouped by model, and generation
within a model by decoding parameters; a group that raises is re-run record by record, and a
generation group that raises fails only its own records, so one tenant's seed or parameter never
fails another tenant's task. Parameters are re-checked with the ingress models
(`conveyor.events.params`): a record that slipped past an older edge fails alone, with the
parameter named. The model is the task's variant (preprocess routed it, `task.model`); a task
whose event lists `shadows` also runs on each of those, and each copy is emitted as its own
inferred event marked `shadow` (or, when the shadow fails, a `failed` status of the copy alone),
never in place of the task's own result (docs/variants.md).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from conveyor.errors import PermanentError
from conveyor.events.catalog import STATUS_TOPIC, STATUS_TYPE
from conveyor.events.model import Event
from conveyor.events.params import parse_params
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.telemetry.tracing import span
from conveyor.variants import SHADOW, SHADOWS, VARIANT
from conveyor.variants import metrics as variant_metrics
from services.inference.settings import InferenceSettings

INFERRED = "conveyor.task.inferred.v1"


def handle_batch(
    events: Sequence[Event], ctx: StageContext[InferenceSettings]
) -> list[BatchOutcome]:
    registry = ctx.resources["models"]
    now = datetime.now(UTC)
    outcomes: list[BatchOutcome] = [None] * len(events)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    shadows: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, event in enumerate(events):
        task = event.data["task"]
        if _expired(task.get("deadline"), now):
            outcomes[i] = _expired_status(task, now)
            continue
        try:
            spec = registry.spec(task["kind"], task.get("model"))
        except KeyError as exc:
            outcomes[i] = PermanentError(str(exc))
            continue
        groups[(spec.kind, spec.name)].append(i)
        for name in filter(None, (event.ext(SHADOWS) or "").split(",")):
            shadows[(spec.kind, name)].append(i)
    for (kind, name), indices in groups.items():
        for i, result in zip(indices, _run_group(ctx, kind, name, events, indices), strict=True):
            outcomes[i] = result
    succeeded = {i: o for i, o in enumerate(outcomes) if isinstance(o, Emit) and o.type == INFERRED}
    for i, copies in _run_shadows(ctx, events, shadows, succeeded, now).items():
        outcomes[i] = [succeeded[i], *copies]
    return outcomes


def _run_shadows(
    ctx: StageContext[InferenceSettings],
    events: Sequence[Event],
    shadows: Mapping[tuple[str, str], list[int]],
    succeeded: Mapping[int, Emit],
    now: datetime,
) -> dict[int, list[Emit]]:
    """Each shadowed record's copies: one inferred event (or `failed` status) per shadow.

    A shadow runs only beside a primary that succeeded: a failed primary is retried, and its
    retry brings the shadow copy again."""
    copies: dict[int, list[Emit]] = defaultdict(list)
    for (kind, name), indices in shadows.items():
        ran = [i for i in indices if i in succeeded]
        results = _run_group(ctx, kind, name, events, ran, shadow=True)
        for i, result in zip(ran, results, strict=True):
            if not isinstance(result, Emit):
                result = _shadow_failed(events[i], name, result, now)
            copies[i].append(result)
    return copies


def _run_group(
    ctx: StageContext[InferenceSettings],
    kind: str,
    name: str,
    events: Sequence[Event],
    indices: list[int],
    *,
    shadow: bool = False,
) -> list[Emit | BaseException]:
    """One model group's outcomes, in `indices` order: an inferred event or the error."""
    if not indices:
        return []
    batch = [events[i].data for i in indices]
    started = time.perf_counter()
    attributes = {
        "conveyor.model": name,
        "conveyor.variant": name,
        "conveyor.shadow": shadow,
        "conveyor.batch.size": len(batch),
    }
    with span(kind, attributes):
        results = _run_isolated(kind, ctx.resources["models"], name, batch)
    elapsed = time.perf_counter() - started
    capacity = ctx.resources.get("capacity")
    if capacity is not None:  # GPU-aware capacity learns from every batch
        capacity.observe(len(indices), elapsed)
    errors = sum(isinstance(r, BaseException) for r in results)
    variant_metrics.observe(
        kind, name, shadow=shadow, seconds=elapsed, ok=len(results) - errors, errors=errors
    )
    per_record_ms = elapsed * 1000 / len(indices)
    # The variant rides in the event from here on; a shadow copy says it is one, so moderation
    # checks it and writeback stores it beside the task, never as the task's result.
    ext = {VARIANT: name, SHADOW: "true"} if shadow else {VARIANT: name}
    out: list[Emit | BaseException] = []
    for i, result in zip(indices, results, strict=True):
        if isinstance(result, BaseException):
            out.append(result)
            continue
        data = events[i].data
        body = {
            "task": data["task"],
            "input": data["input"],
            "model": name,
            "inference_ms": per_record_ms,
            **result,
        }
        out.append(Emit(INFERRED, body, extensions=ext))
    return out


def _shadow_failed(event: Event, name: str, exc: BaseException, now: datetime) -> Emit:
    """A shadow copy that failed: a `failed` status of the copy alone (writeback records it in
    the shadow's runs; the task itself goes on with its primary's result)."""
    task = event.data["task"]
    return Emit(
        STATUS_TYPE,
        {
            "task_id": task["task_id"],
            "tenant": task["tenant"],
            "status": "failed",
            "stage": "inference",
            "reason": f"{type(exc).__name__}: {exc}"[:1000],
            "error_class": type(exc).__name__,
            "attempt": event.attempt,
            "callback_url": None,
            "kind": task.get("kind"),
            "time": now.isoformat(),
        },
        topic=STATUS_TOPIC,
        discriminator="shadow-failed",
        extensions={VARIANT: name, SHADOW: "true"},
    )


Results = list[dict[str, Any] | BaseException]


def _run_isolated(kind: str, registry: Any, name: str, batch: list[Mapping[str, Any]]) -> Results:
    """The model group's results; if the group call raises, each record is run alone, so the
    error lands on the record that causes it (and every record still gets an outcome)."""
    runner = _RUNNERS[kind]
    try:
        model = registry.for_kind(kind, name)
    except Exception as exc:  # the model does not load: no record of the group can run
        return [exc] * len(batch)
    try:
        return runner(model, batch)
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
    out: Results = []
    for data in batch:
        try:
            out.extend(runner(model, [data]))
        except Exception as exc:
            out.append(exc)
    return out


def _generate(model: Any, batch: list[Mapping[str, Any]]) -> Results:
    from conveyor.ml.generator import decoding_groups

    out: Results = []
    runnable: list[tuple[int, Any]] = []
    for i, data in enumerate(batch):
        try:
            runnable.append((i, _gen_params(data["task"]["params"])))
            out.append({})
        except PermanentError as exc:  # one bad record does not fail its batch
            out.append(exc)
    params = [p for _, p in runnable]
    # One call per decoding group: a group that raises fails its own records, not the others.
    for group in decoding_groups(params).values():
        records = [runnable[g][0] for g in group]
        try:
            texts: list[Any] = model.generate(
                [batch[i]["prompt"] for i in records], [params[g] for g in group]
            )
        except Exception as exc:
            texts = [exc] * len(records)
        for i, text in zip(records, texts, strict=True):
            out[i] = text if isinstance(text, BaseException) else {"text": text}
    return out


def _gen_params(raw: Mapping[str, str]) -> Any:
    from conveyor.ml.generator import GenParams

    try:
        typed = parse_params("generate", raw)
        return GenParams(
            max_new_tokens=typed.max_new_tokens,
            do_sample=typed.do_sample,
            temperature=typed.temperature,
            top_p=typed.top_p,
            seed=typed.seed,
        )
    except ValueError as exc:
        raise PermanentError(f"invalid generation parameter: {exc}") from None


def _embed(model: Any, batch: list[Mapping[str, Any]]) -> Results:
    vectors = model.embed([d["input"] for d in batch])
    return [{"embedding": vector} for vector in vectors]


def _classify(model: Any, batch: list[Mapping[str, Any]]) -> Results:
    out: Results = []
    runnable = []
    for data in batch:
        labels = data.get("labels") or _labels_param(data["task"]["params"])
        runnable.append((data["input"], labels))
    if any(not labels for _, labels in runnable):
        return [
            PermanentError("classify needs candidate labels (labels or params.labels)")
            if not labels
            else _one_classify(model, text, labels)
            for text, labels in runnable
        ]
    results = model.classify([t for t, _ in runnable], [labels for _, labels in runnable])
    for result in results:
        out.append({"label": result.label, "label_scores": result.scores})
    return out


def _one_classify(model: Any, text: str, labels: list[str]) -> dict[str, Any]:
    result = model.classify([text], [labels])[0]
    return {"label": result.label, "label_scores": result.scores}


def _labels_param(params: Mapping[str, str]) -> list[str]:
    return [label.strip() for label in params.get("labels", "").split(",") if label.strip()]


_RUNNERS = {"generate": _generate, "embed": _embed, "classify": _classify}


def _expired(deadline: str | None, now: datetime) -> bool:
    if not deadline:
        return False
    try:
        return datetime.fromisoformat(deadline) < now
    except ValueError:
        return False


def _expired_status(task: Mapping[str, Any], now: datetime) -> Emit:
    return Emit(
        STATUS_TYPE,
        {
            "task_id": task["task_id"],
            "tenant": task["tenant"],
            "status": "expired",
            "stage": "inference",
            "reason": f"deadline {task['deadline']} passed before inference",
            "error_class": None,
            "attempt": 0,
            "callback_url": task.get("callback_url"),
            "kind": task.get("kind"),
            "time": now.isoformat(),
        },
        topic=STATUS_TOPIC,
        discriminator="expired",
    )
