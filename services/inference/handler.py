"""inference's decisions: which model serves a task, how a batch is grouped, what expires.

Failures stay with the records that caused them. A batch is grouped by model, and generation
within a model by decoding parameters; a group that raises is re-run record by record, and a
generation group that raises fails only its own records, so one tenant's seed or parameter never
fails another tenant's task. Parameters are re-checked with the ingress models
(`conveyor.events.params`): a record that slipped past an older edge fails alone, with the
parameter named.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from conveyor.errors import PermanentError
from conveyor.events.catalog import STATUS_TOPIC, STATUS_TYPE
from conveyor.events.model import Event
from conveyor.events.params import parse_params
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.telemetry.tracing import span
from services.inference.settings import InferenceSettings
from services.inference.streaming import close_sinks, open_sinks

INFERRED = "conveyor.task.inferred.v1"


def handle_batch(
    events: Sequence[Event], ctx: StageContext[InferenceSettings]
) -> list[BatchOutcome]:
    registry = ctx.resources["models"]
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
    for (kind, name), indices in groups.items():
        batch = [events[i].data for i in indices]
        started = time.perf_counter()
        with span(kind, {"conveyor.model": name, "conveyor.batch.size": len(batch)}):
            results = _run_isolated(kind, registry, name, batch, ctx.resources.get("streams"))
        elapsed = time.perf_counter() - started
        capacity = ctx.resources.get("capacity")
        if capacity is not None:  # GPU-aware capacity learns from every batch
            capacity.observe(len(indices), elapsed)
        per_record_ms = elapsed * 1000 / len(indices)
        for i, result in zip(indices, results, strict=True):
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


def _run_isolated(
    kind: str, registry: Any, name: str, batch: list[Mapping[str, Any]], streams: Any = None
) -> Results:
    """The model group's results; if the group call raises, each record is run alone, so the
    error lands on the record that causes it (and every record still gets an outcome)."""
    runner = _runner(kind, streams)
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


def _runner(kind: str, streams: Any) -> Callable[[Any, list[Mapping[str, Any]]], Results]:
    if kind == "generate" and streams is not None:  # streaming tasks' text: docs/streaming.md
        return partial(_generate, streams=streams)
    return _RUNNERS[kind]


def _generate(model: Any, batch: list[Mapping[str, Any]], streams: Any = None) -> Results:
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
        sinks = open_sinks(streams, [batch[i] for i in records])
        try:
            texts: list[Any] = model.generate(
                [batch[i]["prompt"] for i in records],
                [params[g] for g in group],
                **({"sinks": sinks} if sinks else {}),
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
