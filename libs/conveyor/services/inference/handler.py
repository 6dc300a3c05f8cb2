"""inference's decisions: which model serves a task, how a batch is grouped, what expires.

Failures stay with the records that caused them. A batch is grouped by model, and generation
within a model by decoding parameters; a group that raises is re-run record by record, and a
generation group that raises fails only its own records, so one tenant's seed or parameter never
fails another tenant's task. Parameters are re-checked with the ingress models
(`conveyor.events.params`): a record that slipped past an older edge fails alone, with the
parameter named. With result reuse on (`conveyor.reuse`), records whose identical task already
ran take its stored result, identical records of one batch run once, and only the rest reach the
model; every record still gets its own inferred event. The model is the task's variant
(preprocess routed it, `task.model`); a task whose event lists `shadows` also runs on each of
those, and each copy is emitted as its own inferred event marked `shadow` (or, when the shadow
fails, a `failed` status of the copy alone), never in place of the task's own result
(docs/variants.md).

A cancelled task is not run (docs/cancellation.md): before each model group runs, the stage's
cancel watch is synced with the cancel topic (every cancel the broker acknowledged before is
then known) and the group's cancelled tasks are left out; a generation in progress reads its
tasks' cancel flags after every token and stops a cancelled one there. A cancelled task emits
nothing: its `cancelled` status is already recorded. Each model run is logged with the time of
its cancel check and its task ids, which is how the tests count model runs.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from conveyor.cancel.watch import SKIPPED, CancelWatch, task_of
from conveyor.errors import PermanentError, RetryableError
from conveyor.events.catalog import INFERRED_TYPE as INFERRED
from conveyor.events.params import parse_params
from conveyor.events.payloads import Task, TaskInferred, TaskPreprocessed
from conveyor.events.status import StatusData
from conveyor.reuse import REUSED, ReuseCache, ReusePlan
from conveyor.runtime import Emit
from conveyor.runtime.handler import BatchOutcome, status_emit
from conveyor.runtime.typed import Context, Record, emit
from conveyor.services.inference.settings import InferenceSettings
from conveyor.store.base import TaskStatus
from conveyor.streaming.sinks import close_sinks, open_sinks
from conveyor.telemetry.metrics import MODEL_RECORDS
from conveyor.telemetry.tracing import span
from conveyor.variants import SHADOW, SHADOWS, VARIANT
from conveyor.variants import metrics as variant_metrics

if TYPE_CHECKING:
    from conveyor.ml.capacity import CapacityController
    from conveyor.ml.registry import ModelRegistry
    from conveyor.ml.specs import Kind
    from conveyor.streaming.publisher import ChunkPublisher
    from conveyor.telemetry.gpu import GpuSampler


@dataclass(frozen=True, slots=True)
class InferenceResources:
    """What inference's handler uses; every field but the models is optional (None: off)."""

    models: ModelRegistry
    capacity: CapacityController | None = None  # GPU-aware batch sizing (the runtime reads it)
    reuse: ReuseCache | None = None  # result reuse (conveyor.reuse)
    streams: ChunkPublisher | None = None  # streaming tasks' chunks (docs/streaming.md)
    gpu_sampler: GpuSampler | None = None  # conveyor_gpu_* metrics while CUDA is present


Input = Record[TaskPreprocessed]
InferenceContext = Context[InferenceSettings, InferenceResources]


def handle_batch(records: Sequence[Input], ctx: InferenceContext) -> list[BatchOutcome]:
    registry = ctx.resources.models
    cancels = ctx.cancels
    now = datetime.now(UTC)
    outcomes: list[BatchOutcome] = [None] * len(records)
    models: dict[int, str] = {}
    shadows: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        task = record.data.task
        if _expired(task.deadline, now):
            outcomes[i] = _expired_status(task, now)
            continue
        try:
            spec = registry.spec(cast("Kind", task.kind), task.model)
        except KeyError as exc:
            outcomes[i] = PermanentError(str(exc))
            continue
        models[i] = spec.name
        for name in filter(None, (record.event.ext(SHADOWS) or "").split(",")):
            shadows[(spec.kind, name)].append(i)
    reuse = ctx.resources.reuse
    plan = ReusePlan()
    if reuse is not None:
        # The model name is the task's variant (preprocess routed it): part of the reuse key.
        plan = reuse.begin([(i, records[i].event, name) for i, name in models.items()])
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, name in models.items():
        if not plan.settled(i):
            groups[(records[i].data.task.kind, name)].append(i)
    results: dict[int, Any] = {}
    for (kind, name), group in groups.items():
        indices = _runnable(records, group, cancels, ctx, f"kind={kind} model={name}")
        ran, per_record_ms = _run_group(ctx, kind, name, records, indices, cancels=cancels)
        for i, result in zip(indices, ran, strict=True):
            if cancels is not None and _cancelled(cancels, records[i]):
                # Cancelled while it ran (a generation stopped early): nothing to emit, and its
                # cut-short text is never kept for reuse.
                continue
            results[i] = result
            outcomes[i] = _inferred(records[i], name, per_record_ms, result, **{VARIANT: name})
    if reuse is not None:
        _settle(records, plan, results, models, outcomes)
        reuse.finish(plan, results, models)
    succeeded = {i: o for i, o in enumerate(outcomes) if isinstance(o, Emit) and o.type == INFERRED}
    for i, copies in _run_shadows(ctx, records, shadows, succeeded, now).items():
        outcomes[i] = [succeeded[i], *copies]
    return outcomes


def _run_group(
    ctx: InferenceContext,
    kind: str,
    name: str,
    records: Sequence[Input],
    indices: list[int],
    *,
    cancels: CancelWatch | None = None,
    shadow: bool = False,
) -> tuple[Results, float]:
    """One model group's results, in `indices` order, and the model time per record (ms)."""
    if not indices:
        return [], 0.0
    batch = [records[i].data for i in indices]
    flags = [_flag(cancels, records[i]) for i in indices] if cancels is not None else None
    # A shadow copy streams nothing: its text never reaches the task's caller.
    streams = None if shadow else ctx.resources.streams
    attributes = {
        "conveyor.model": name,
        "conveyor.variant": name,
        "conveyor.shadow": shadow,
        "conveyor.batch.size": len(batch),
    }
    started = time.perf_counter()
    with span(kind, attributes):
        ran = _run_isolated(kind, ctx.resources.models, name, batch, flags, streams)
    MODEL_RECORDS.labels("inference", kind, name).inc(len(indices))
    elapsed = time.perf_counter() - started
    capacity = ctx.resources.capacity
    if capacity is not None:  # GPU-aware capacity learns from every batch
        capacity.observe(len(indices), elapsed)
    errors = sum(isinstance(r, BaseException) for r in ran)
    variant_metrics.observe(
        kind, name, shadow=shadow, seconds=elapsed, ok=len(ran) - errors, errors=errors
    )
    return ran, elapsed * 1000 / len(indices)


def _run_shadows(
    ctx: InferenceContext,
    records: Sequence[Input],
    shadows: Mapping[tuple[str, str], list[int]],
    succeeded: Mapping[int, Emit],
    now: datetime,
) -> dict[int, list[Emit]]:
    """Each shadowed record's copies: one inferred event (or `failed` status) per shadow.

    A shadow runs only beside a primary that succeeded (or reused a result): a failed primary
    is retried, and its retry brings the shadow copy again. The variant rides in the event from
    here on; a shadow copy says it is one, so moderation checks it and writeback stores it beside
    the task, never as the task's result."""
    copies: dict[int, list[Emit]] = defaultdict(list)
    for (kind, name), indices in shadows.items():
        ran = [i for i in indices if i in succeeded]
        results, per_record_ms = _run_group(ctx, kind, name, records, ran, shadow=True)
        for i, result in zip(ran, results, strict=True):
            if isinstance(result, BaseException):
                copies[i].append(_shadow_failed(records[i], name, result, now))
                continue
            ext = {VARIANT: name, SHADOW: "true"}
            copy = _inferred(records[i], name, per_record_ms, result, **ext)
            assert isinstance(copy, Emit)
            copies[i].append(copy)
    return copies


def _shadow_failed(record: Input, name: str, exc: BaseException, now: datetime) -> Emit:
    """A shadow copy that failed: a `failed` status of the copy alone (writeback records it in
    the shadow's runs; the task itself goes on with its primary's result)."""
    task = record.data.task
    report = StatusData(
        task_id=task.task_id,
        tenant=task.tenant,
        status=TaskStatus.FAILED,
        stage="inference",
        reason=f"{type(exc).__name__}: {exc}"[:1000],
        error_class=type(exc).__name__,
        attempt=record.event.attempt,
        callback_url=None,
        kind=task.kind,
        time=now.isoformat(),
    )
    return status_emit(
        report, discriminator="shadow-failed", extensions={VARIANT: name, SHADOW: "true"}
    )


def _inferred(
    record: Input, model: str, ms: float, result: Mapping[str, Any] | BaseException, **ext: str
) -> BatchOutcome:
    """The inferred event of `result`, the model's output fields (text, embedding or label and
    its scores; a reused result carries the same fields)."""
    if isinstance(result, BaseException):
        return result
    data = record.data
    inferred = TaskInferred(
        task=data.task,
        input=data.input,
        model=model,
        text=result.get("text"),
        embedding=result.get("embedding"),
        label=result.get("label"),
        label_scores=result.get("label_scores") or {},
        inference_ms=ms,
    )
    return emit(inferred, extensions=ext)


def _settle(
    records: Sequence[Input],
    plan: ReusePlan,
    results: Mapping[int, Any],
    models: Mapping[int, str],
    outcomes: list[BatchOutcome],
) -> None:
    """The outcomes of records the model did not run for: reused, waiting, or coalesced."""
    for i, reused in plan.reused.items():
        ext = {REUSED: reused.source_task_id, VARIANT: reused.model}
        outcomes[i] = _inferred(records[i], reused.model, 0.0, reused.result, **ext)
    for i, waiting in plan.waiting.items():
        outcomes[i] = waiting
    for i, leader in plan.followers.items():
        if i in plan.reused or i in plan.waiting:
            continue
        source = records[leader].data.task.task_id
        if leader not in results:  # the identical task it waited on was cancelled: run it later
            outcomes[i] = RetryableError(f"identical task {source} was cancelled before it ran")
            continue
        ext = {REUSED: source, VARIANT: models[leader]}
        outcomes[i] = _inferred(records[i], models[leader], 0.0, results[leader], **ext)


Results = list[dict[str, Any] | BaseException]
Flags = list[Callable[[], bool]] | None


def _runnable(
    records: Sequence[Input],
    group: list[int],
    cancels: CancelWatch | None,
    ctx: InferenceContext,
    what: str,
) -> list[int]:
    """The group's records whose task is not cancelled, checked against every cancel the
    broker acknowledged before this call; the model run that follows is logged."""
    if cancels is None:
        return group
    checked_at = time.time()
    if not cancels.sync():
        ctx.log.warning("cancel topic not read to its end in time: running on what is known")
    runnable = [i for i in group if not _cancelled(cancels, records[i])]
    if len(runnable) < len(group):
        SKIPPED.labels(ctx.stage).inc(len(group) - len(runnable))
    if runnable:
        ids = ",".join(str(records[i].event.subject) for i in runnable)
        line = "model run %s tasks=%d checked_at=%.6f task_ids=%s"
        ctx.log.info(line, what, len(runnable), checked_at, ids)
    return runnable


def _cancelled(cancels: CancelWatch, record: Input) -> bool:
    task = task_of(record.event)
    return task is not None and cancels.contains(*task)


def _flag(cancels: CancelWatch, record: Input) -> Callable[[], bool]:
    return lambda: _cancelled(cancels, record)


def _run_isolated(
    kind: str,
    registry: ModelRegistry,
    name: str,
    batch: list[TaskPreprocessed],
    flags: Flags = None,
    streams: ChunkPublisher | None = None,
) -> Results:
    """The model group's results; if the group call raises, each record is run alone, so the
    error lands on the record that causes it (and every record still gets an outcome)."""
    runner = _runner(kind, streams)
    try:
        model = registry.for_kind(cast("Kind", kind), name)
    except Exception as exc:  # the model does not load: no record of the group can run
        return [exc] * len(batch)
    try:
        return runner(model, batch, flags)
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
    out: Results = []
    for n, data in enumerate(batch):
        flag = [flags[n]] if flags is not None else None
        if flag is not None and flag[0]():  # cancelled while its batch ran: not run again
            out.append(PermanentError("cancelled"))
            continue
        try:
            out.extend(runner(model, [data], flag))
        except Exception as exc:
            out.append(exc)
    return out


Runner = Callable[[Any, list[TaskPreprocessed], Flags], Results]


def _runner(kind: str, streams: ChunkPublisher | None) -> Runner:
    if kind == "generate" and streams is not None:  # streaming tasks' text: docs/streaming.md

        def streamed(model: Any, batch: list[TaskPreprocessed], flags: Flags = None) -> Results:
            return _generate(model, batch, flags, streams)

        return streamed
    return _RUNNERS[kind]


def _generate(
    model: Any,
    batch: list[TaskPreprocessed],
    flags: Flags = None,
    streams: ChunkPublisher | None = None,
) -> Results:
    from conveyor.ml.generator import decoding_groups

    out: Results = []
    runnable: list[tuple[int, Any]] = []
    for i, data in enumerate(batch):
        try:
            runnable.append((i, _gen_params(data.task.params)))
            out.append({})
        except PermanentError as exc:  # one bad record does not fail its batch
            out.append(exc)
    params = [p for _, p in runnable]
    # One call per decoding group: a group that raises fails its own records, not the others.
    for group in decoding_groups(params).values():
        records = [runnable[g][0] for g in group]
        sinks = open_sinks(streams, [batch[i] for i in records])
        # Cancel flags only when the stage follows cancels (test doubles take no such argument).
        extra: dict[str, Any] = {}
        if flags is not None:
            extra["cancelled"] = [flags[i] for i in records]
        if sinks:
            extra["sinks"] = sinks
        try:
            texts: list[Any] = model.generate(
                [batch[i].prompt for i in records], [params[g] for g in group], **extra
            )
        except Exception as exc:
            texts = [exc] * len(records)
        finally:
            close_sinks(sinks)
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


def _embed(model: Any, batch: list[TaskPreprocessed], _flags: Flags = None) -> Results:
    vectors = model.embed([d.input for d in batch])
    return [{"embedding": vector} for vector in vectors]


def _classify(model: Any, batch: list[TaskPreprocessed], _flags: Flags = None) -> Results:
    out: Results = []
    runnable = []
    for data in batch:
        labels = list(data.labels) or _labels_param(data.task.params)
        runnable.append((data.input, labels))
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


_RUNNERS: dict[str, Runner] = {"generate": _generate, "embed": _embed, "classify": _classify}


def _expired(deadline: str | None, now: datetime) -> bool:
    if not deadline:
        return False
    try:
        return datetime.fromisoformat(deadline) < now
    except ValueError:
        return False


def _expired_status(task: Task, now: datetime) -> Emit:
    report = StatusData(
        task_id=task.task_id,
        tenant=task.tenant,
        status=TaskStatus.EXPIRED,
        stage="inference",
        time=now.isoformat(),
        reason=f"deadline {task.deadline} passed before inference",
        callback_url=task.callback_url,
        kind=task.kind,
    )
    return status_emit(report, discriminator="expired")
