"""inference's decisions: which model serves a task, how a batch is grouped, what expires.

Failures stay with the records that caused them. A batch is grouped by model, and generation
within a model by decoding parameters; a group that raises is re-run record by record, and a
generation group that raises fails only its own records, so one tenant's seed or parameter never
fails another tenant's task. Parameters are re-checked with the ingress models
(`conveyor.events.params`): a record that slipped past an older edge fails alone, with the
parameter named.

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
from datetime import UTC, datetime
from typing import Any

from conveyor.cancel.watch import SKIPPED, CancelWatch, task_of
from conveyor.errors import PermanentError
from conveyor.events.catalog import STATUS_TOPIC, STATUS_TYPE
from conveyor.events.model import Event
from conveyor.events.params import parse_params
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.telemetry.tracing import span
from services.inference.settings import InferenceSettings

INFERRED = "conveyor.task.inferred.v1"


def handle_batch(
    events: Sequence[Event], ctx: StageContext[InferenceSettings]
) -> list[BatchOutcome]:
    registry = ctx.resources["models"]
    cancels: CancelWatch | None = ctx.resources.get("cancels")
    now = datetime.now(UTC)
    outcomes: list[BatchOutcome] = [None] * len(events)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
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
    for (kind, name), group in groups.items():
        indices = _runnable(events, group, cancels, ctx, f"kind={kind} model={name}")
        if not indices:
            continue
        batch = [events[i].data for i in indices]
        flags = [_flag(cancels, events[i]) for i in indices] if cancels is not None else None
        started = time.perf_counter()
        with span(kind, {"conveyor.model": name, "conveyor.batch.size": len(batch)}):
            results = _run_isolated(kind, registry, name, batch, flags)
        elapsed = time.perf_counter() - started
        capacity = ctx.resources.get("capacity")
        if capacity is not None:  # GPU-aware capacity learns from every batch
            capacity.observe(len(indices), elapsed)
        per_record_ms = elapsed * 1000 / len(indices)
        for i, result in zip(indices, results, strict=True):
            if cancels is not None and _cancelled(cancels, events[i]):
                continue  # cancelled while it ran (a generation stopped early): nothing to emit
            if isinstance(result, BaseException):
                outcomes[i] = result
                continue
            data = events[i].data
            outcomes[i] = Emit(
                INFERRED,
                {
                    "task": data["task"],
                    "input": data["input"],
                    "model": name,
                    "inference_ms": per_record_ms,
                    **result,
                },
            )
    return outcomes


Results = list[dict[str, Any] | BaseException]
Flags = list[Callable[[], bool]] | None


def _runnable(
    events: Sequence[Event],
    group: list[int],
    cancels: CancelWatch | None,
    ctx: StageContext[InferenceSettings],
    what: str,
) -> list[int]:
    """The group's records whose task is not cancelled, checked against every cancel the
    broker acknowledged before this call; the model run that follows is logged."""
    if cancels is None:
        return group
    checked_at = time.time()
    if not cancels.sync():
        ctx.log.warning("cancel topic not read to its end in time: running on what is known")
    runnable = [i for i in group if not _cancelled(cancels, events[i])]
    if len(runnable) < len(group):
        SKIPPED.labels(ctx.stage).inc(len(group) - len(runnable))
    if runnable:
        ids = ",".join(str(events[i].subject) for i in runnable)
        line = "model run %s tasks=%d checked_at=%.6f task_ids=%s"
        ctx.log.info(line, what, len(runnable), checked_at, ids)
    return runnable


def _cancelled(cancels: CancelWatch, event: Event) -> bool:
    task = task_of(event)
    return task is not None and cancels.contains(*task)


def _flag(cancels: CancelWatch, event: Event) -> Callable[[], bool]:
    return lambda: _cancelled(cancels, event)


def _run_isolated(
    kind: str, registry: Any, name: str, batch: list[Mapping[str, Any]], flags: Flags = None
) -> Results:
    """The model group's results; if the group call raises, each record is run alone, so the
    error lands on the record that causes it (and every record still gets an outcome)."""
    runner = _RUNNERS[kind]
    try:
        model = registry.for_kind(kind, name)
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


def _generate(model: Any, batch: list[Mapping[str, Any]], flags: Flags = None) -> Results:
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
        # Cancel flags only when the stage follows cancels (test doubles take no such argument).
        stop = {"cancelled": [flags[i] for i in records]} if flags is not None else {}
        try:
            texts: list[Any] = model.generate(
                [batch[i]["prompt"] for i in records], [params[g] for g in group], **stop
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


def _embed(model: Any, batch: list[Mapping[str, Any]], _flags: Flags = None) -> Results:
    vectors = model.embed([d["input"] for d in batch])
    return [{"embedding": vector} for vector in vectors]


def _classify(model: Any, batch: list[Mapping[str, Any]], _flags: Flags = None) -> Results:
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
