"""Typed generation/classification parameters, one model per task kind, checked at the edge.

A task's `params` travel as a flat map (JSON values from HTTP, strings in Avro); each kind has a
pydantic model that names every parameter it understands with its range, so a value that would
break a model call (a seed of 1e30, an infinite temperature, a budget of a million tokens) is
refused where the task enters, with the parameter named, instead of failing a batch later.
Inference reads the same models, so a record that slipped past an older edge fails alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# A hard ceiling whatever a task asks: one record must not hold a batch for minutes.
MAX_NEW_TOKENS = 4096
# torch seeds are 64-bit; the signed range is what every generator (CPU, CUDA, numpy) accepts.
MAX_SEED = 2**63 - 1
# Below 0.01 the softmax of scaled logits underflows to NaN; above 100 sampling is uniform noise.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_LABELS = 64
MAX_LABEL_CHARS = 200


class _Params(BaseModel):
    # Lax mode on purpose: Avro carries every value as a string ("7", "true", "0.8").
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Every kind: `cache: false` runs the model even when an identical task's result is stored,
    # and keeps this task's result out of reuse (conveyor.reuse, docs/reuse.md).
    cache: bool = Field(True, description="reuse an identical earlier task's result")


class GenerateParams(_Params):
    """Decoding settings of a `generate` task."""

    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="token budget; default: the model's"
    )
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(
        1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="sampling temperature"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="reproducible sampling")
    # Partial text goes to the task's WebSocket as it is generated, each chunk moderated first;
    # the stored result, moderation and webhook are the same either way (docs/streaming.md).
    stream: bool = Field(False, description="push partial text to the task's WebSocket")


class EmbedParams(_Params):
    """`embed` takes no parameters of its own (only `cache`)."""


class ClassifyParams(_Params):
    """`classify` may give its candidate labels here, comma separated, instead of `labels`."""

    labels: str | None = Field(None, max_length=MAX_LABELS * (MAX_LABEL_CHARS + 1))

    @field_validator("labels")
    @classmethod
    def _bounded(cls, value: str | None) -> str | None:
        if value is not None:
            check_labels([label.strip() for label in value.split(",") if label.strip()])
        return value


PARAMS_MODELS: dict[str, type[_Params]] = {
    "generate": GenerateParams,
    "embed": EmbedParams,
    "classify": ClassifyParams,
}


def check_labels(labels: list[str]) -> list[str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels")
    for label in labels:
        if not 1 <= len(label) <= MAX_LABEL_CHARS:
            raise ValueError(f"each label must have 1 to {MAX_LABEL_CHARS} characters")
    return labels


class InvalidParamsError(ValueError):
    """Which parameters are wrong and why, as `params.<name>: <reason>` lines."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {why}" for field, why in problems))


def parse_params(kind: str, raw: Mapping[str, Any]) -> Any:
    """The typed params of a task of `kind`; `InvalidParamsError` names each bad parameter."""
    model = PARAMS_MODELS.get(kind)
    if model is None:
        return None  # the kind itself is wrong: that error is reported on `kind`
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        raise InvalidParamsError(
            [
                ("params." + ".".join(str(p) for p in err["loc"]), err["msg"])
                for err in exc.errors(include_input=False, include_url=False)
            ]
        ) from None


def canonical_params(typed: _Params) -> dict[str, str | int | float | bool]:
    """The parameters a task set, with their validated types (for the Avro map of strings)."""
    values: dict[str, str | int | float | bool] = typed.model_dump(exclude_unset=True)
    return values
