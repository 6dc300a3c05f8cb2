"""The ingress contract: what a submitted task may contain, checked with pydantic at the edge.

Preprocess applies it to every `conveyor.task.submitted.v1` event (JSON or Avro); the gateway
and `conveyor submit` apply the same model before sending, so callers get the error at once.
`params` are checked by the kind's typed model (`conveyor.events.params`). What only the
deployment knows, the configured templates and models, comes in as `TaskRules`: each edge passes
the rules of the pipeline it feeds, so an unknown template or model is refused there too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from conveyor.errors import PermanentError
from conveyor.events.params import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    InvalidParamsError,
    canonical_params,
    check_labels,
    parse_params,
)

# A deadline is when a task stops being worth running: a year ahead covers any real use, and an
# earlier bound keeps arithmetic on it (UTC conversion, timeouts) far from datetime's limits.
# Past deadlines are valid: such a task ends `expired`, which is what its caller asked for.
MIN_DEADLINE = datetime(2000, 1, 1, tzinfo=UTC)
MAX_DEADLINE_AHEAD = timedelta(days=366)


@dataclass(frozen=True, slots=True)
class TaskRules:
    """What the pipeline behind an edge can run: template ids and model names per kind.

    `None` leaves that check to the stage that knows (preprocess for templates, inference for
    models); an empty set refuses every explicit value.
    """

    templates: frozenset[str] | None = None
    models: Mapping[str, frozenset[str]] | None = field(default=None)


class InvalidTaskError(PermanentError):
    """A task the ingress contract refuses; `fields` names each offending field."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


class TaskRequest(BaseModel):
    """A submitted task (JSON object, or task-submitted Avro data)."""

    model_config = ConfigDict(extra="forbid", str_max_length=100_000)

    task_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["generate", "embed", "classify"]
    input: str
    template: str | None = Field(None, max_length=64)
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        max_length=32,
        description="per kind: generate takes max_new_tokens (1..4096), do_sample, "
        "temperature (0.01..100), top_p (0..1], seed (0..2^63-1); classify takes labels "
        "(comma separated); embed takes none; every kind takes cache (true/false: reuse an "
        "identical earlier task's result, docs/reuse.md)",
    )
    priority: Literal["high", "normal", "low"] = "normal"
    callback_url: str | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=2048)
    deadline: datetime | None = Field(
        None, description="RFC 3339; from 2000 to a year ahead; once passed, the task expires"
    )
    model: str | None = Field(None, max_length=128)
    labels: list[str] = Field(
        default_factory=list,
        max_length=MAX_LABELS,
        description=f"classify: candidate labels, 1 to {MAX_LABEL_CHARS} characters each",
    )

    @field_validator("deadline")
    @classmethod
    def _sane_deadline(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            latest = datetime.now(UTC) + MAX_DEADLINE_AHEAD
            if MIN_DEADLINE <= value <= latest:
                return value
        except OverflowError:  # an offset that pushes it past datetime's range
            pass
        raise ValueError("deadline must lie between 2000-01-01 and a year from now")

    @field_validator("labels")
    @classmethod
    def _bounded_labels(cls, value: list[str]) -> list[str]:
        return check_labels(value)

    @field_validator("params")
    @classmethod
    def _typed_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        kind = info.data.get("kind")
        if kind is None:
            return value  # the kind is wrong; its own error says so
        try:
            return canonical_params(parse_params(kind, value))
        except InvalidParamsError as exc:
            raise PydanticCustomError(
                "invalid_params", "{problems}", {"problems": str(exc), "fields": exc.problems}
            ) from None

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        rules = _rules(info)
        if value is not None and rules.templates is not None and value not in rules.templates:
            raise ValueError(f"unknown template (known: {', '.join(sorted(rules.templates))})")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        rules, kind = _rules(info), info.data.get("kind")
        if value is None or rules.models is None or kind is None:
            return value
        known = rules.models.get(kind, frozenset())
        if value not in known:
            raise ValueError(f"no model of kind {kind} is named so (known: {sorted(known)})")
        return value

    def avro(self) -> dict[str, Any]:
        """The task as task-submitted Avro data (params as strings, deadline as RFC 3339)."""
        return {
            "task_id": self.task_id,
            "tenant": self.tenant,
            "kind": self.kind,
            "input": self.input,
            "template": self.template,
            "params": {k: param_text(v) for k, v in self.params.items()},
            "priority": self.priority,
            "callback_url": self.callback_url,
            "deadline": self.deadline.isoformat() if self.deadline else None,
            "model": self.model,
            "labels": list(self.labels),
        }


_NO_RULES = TaskRules()


def _rules(info: ValidationInfo) -> TaskRules:
    context = info.context
    rules = context.get("rules") if isinstance(context, dict) else None
    return rules if isinstance(rules, TaskRules) else _NO_RULES


def param_text(value: str | int | float | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_task(data: Any, rules: TaskRules | None = None) -> TaskRequest:
    """Validate `data`; raise `InvalidTaskError` naming every problem and field."""
    if not isinstance(data, Mapping):
        raise InvalidTaskError("task data must be a JSON object")
    try:
        return TaskRequest.model_validate(dict(data), context={"rules": rules or _NO_RULES})
    except ValidationError as exc:
        problems: list[tuple[str, str]] = []
        for err in exc.errors(include_url=False, include_input=False):
            if err["type"] == "invalid_params":
                problems.extend(err["ctx"]["fields"])
            else:
                loc = ".".join(str(p) for p in err["loc"]) or "data"
                problems.append((loc, err["msg"]))
        message = "; ".join(f"{loc}: {msg}" for loc, msg in problems)
        fields = tuple(dict.fromkeys(loc for loc, _ in problems))
        raise InvalidTaskError(f"invalid task: {message}", fields) from None
