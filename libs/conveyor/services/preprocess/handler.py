"""preprocess's decisions: what a valid task is, how its text is normalised and templated,
how many tokens it has, which priority lane it takes and which model variant serves it.

The task id in the data is the task's identity (the runtime derives every output's key, subject
and event id from it). A task submitted without one takes the event's `subject`, else an id
derived from the ingress event's source and id (`auto-...`, the same on a redelivery); its
preprocessed event says so (`assignedid`), and writeback puts that in the timeline.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor.errors import PermanentError
from conveyor.events.catalog import PREPROCESSED_TYPE as PREPROCESSED
from conveyor.events.catalog import load_catalog
from conveyor.events.ingress import TaskRules, param_text, parse_task
from conveyor.events.model import ASSIGNED_ID, Event, assigned_task_id
from conveyor.events.payloads import Task, TaskPreprocessed
from conveyor.runtime import Emit
from conveyor.runtime.typed import Context, Record, emit
from conveyor.services.preprocess.settings import PreprocessSettings
from conveyor.telemetry.tracing import span
from conveyor.variants import SHADOWS, VARIANT
from conveyor.variants.source import VariantSource
from conveyor.variants.table import Route

TokenCounter = Callable[[str, str], int]  # (kind, text) -> tokens
_SPACE = re.compile(r"[ \t\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True, slots=True)
class PreprocessResources:
    """preprocess's token counter, the ingress rules (templates, models) and variant routing
    (None: no check, no routing)."""

    count_tokens: TokenCounter
    rules: TaskRules | None = None
    variants: VariantSource | None = None


# The submitted data is the ingress edge: any JSON, validated by the ingress model (pydantic).
Submitted = Record[Any]


def normalise(text: str) -> str:
    """Unicode NFKC, unified newlines, runs of spaces collapsed, at most one blank line."""
    text = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def handle(record: Submitted, ctx: Context[PreprocessSettings, PreprocessResources]) -> Emit:
    s, event = ctx.settings, record.event
    # A task the ingress contract refuses (params out of range, unknown template or model) is
    # permanent: it is dead-lettered and its caller sees `failed` with the reason.
    data, assigned_from = with_task_id(event)
    task = parse_task(data, ctx.resources.rules)
    if event.subject and event.subject != task.task_id:
        raise PermanentError(f"subject {event.subject!r} differs from task_id {task.task_id!r}")
    text = normalise(task.input)
    if not text:
        raise PermanentError("input is empty after normalisation")
    if len(text) > s.max_input_chars:
        raise PermanentError(f"input has {len(text)} characters, over {s.max_input_chars}")
    template_id = task.template or s.default_template
    template = s.templates.get(template_id)
    if template is None:
        raise PermanentError(f"unknown template {template_id!r}")
    prompt = template.replace("{input}", text)
    with span("tokenise", {"conveyor.task.kind": task.kind}):
        tokens = ctx.resources.count_tokens(task.kind, prompt)
    if tokens > s.max_input_tokens:
        raise PermanentError(f"prompt has {tokens} tokens, over the limit of {s.max_input_tokens}")
    route = _route(ctx.resources.variants, task.kind, task.tenant, task.task_id, task.model)
    preprocessed = TaskPreprocessed(
        task=Task(
            task_id=task.task_id,
            tenant=task.tenant,
            kind=task.kind,
            priority=task.priority,
            callback_url=task.callback_url,
            deadline=task.deadline.isoformat() if task.deadline else None,
            submitted_at=event.time or datetime.now(UTC).isoformat(),
            model=route.variant if route else task.model,
            params={k: param_text(v) for k, v in task.params.items()},
        ),
        input=text,
        prompt=prompt,
        token_count=tokens,
        labels=task.labels,
    )
    ext = {"tenant": task.tenant, "priority": task.priority}
    if assigned_from is not None:
        ext[ASSIGNED_ID] = assigned_from
    if task.deadline is not None:
        ext["deadline"] = task.deadline.isoformat()
    if route is not None:
        ext[VARIANT] = route.variant
        if route.shadows:
            ext[SHADOWS] = ",".join(route.shadows)
    topic = load_catalog().lane_topic(PREPROCESSED, task.priority)
    return emit(preprocessed, topic=topic, extensions=ext)


def _route(
    variants: VariantSource | None, kind: str, tenant: str, task_id: str, model: str | None
) -> Route | None:
    """The task's variant (sticky: a hash of tenant and task id) and shadow copies."""
    if variants is None:
        return None
    try:
        return variants.route(kind, tenant, task_id, model)
    except LookupError:
        raise PermanentError(f"no {kind} variant serves tenant {tenant!r}") from None


def with_task_id(event: Event) -> tuple[Any, str | None]:
    """The task data with an id, and what an assigned id was derived from (None: it had one)."""
    data = event.data
    if not isinstance(data, Mapping) or data.get("task_id") not in (None, ""):
        return data, None  # not a task object (parse_task says why), or it names its id
    if event.subject:
        return {**data, "task_id": event.subject}, f"subject {event.subject}"
    origin = f"event {event.source} {event.id}"
    return {**data, "task_id": assigned_task_id(origin)}, origin


def word_count(_kind: str, text: str) -> int:
    """The fallback counter when tokenizers are switched off: whitespace-separated words."""
    return len(text.split())
