"""moderation's policy: which texts are checked, how signal scores become a verdict, and
what is withheld.

Signals score each text in [0, 1] with a reason: `profanity` (alt-profanity-check),
`blocklist` (configured rules) and, when examples are configured, `embedding_similarity`.
Both the input and the generated text are checked: a model must not be used to launder a
request, nor to produce abuse. A task's score per signal is its worst text's. The task is
blocked when any signal reaches its block threshold, flagged when any reaches its flag
threshold, allowed otherwise (`conveyor.ml.policy.decide`, which inference's stream gate
applies too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.events.payloads import TaskInferred, TaskModerated
from conveyor.ml.moderation import Signal, SignalResult
from conveyor.ml.policy import LEVELS, Verdict, decide
from conveyor.runtime.handler import BatchOutcome
from conveyor.runtime.typed import Context, Record, emit
from conveyor.services.moderation.settings import ModerationSettings
from conveyor.telemetry.tracing import span

# The policy (thresholds -> verdict) is shared with inference's stream gate: conveyor.ml.policy.
__all__ = ["LEVELS", "ModerationResources", "Verdict", "decide", "handle_batch"]


@dataclass(frozen=True, slots=True)
class ModerationResources:
    """What moderation's handler uses: the configured signals, in policy order."""

    signals: Sequence[Signal]


def handle_batch(
    records: Sequence[Record[TaskInferred]],
    ctx: Context[ModerationSettings, ModerationResources],
) -> list[BatchOutcome]:
    texts = [_texts(record.data) for record in records]
    flat = [t for group in texts for t in group]
    results: dict[str, list[SignalResult]] = {}
    for signal in ctx.resources.signals:
        with span(f"classify {signal.name}", {"conveyor.texts": len(flat)}):
            results[signal.name] = signal.evaluate(flat)
    out: list[BatchOutcome] = []
    pos = 0
    for record, group in zip(records, texts, strict=True):
        worst = {
            name: max(rs[pos : pos + len(group)], key=lambda r: r.score)
            for name, rs in results.items()
        }
        pos += len(group)
        scores = {name: (r.score, r.reason) for name, r in worst.items()}
        verdict = decide(scores, ctx.settings.thresholds)
        out.append(emit(moderated(record.data, verdict)))
    return out


def _texts(data: TaskInferred) -> list[str]:
    texts = [data.input]
    if data.text:
        texts.append(data.text)
    return texts


def moderated(data: TaskInferred, verdict: Verdict) -> TaskModerated:
    """The moderated task; a blocked one carries none of the model's output."""
    if verdict.verdict == "block":
        return TaskModerated(
            task=data.task,
            model=data.model,
            verdict=verdict.verdict,
            scores=verdict.scores,
            reasons=verdict.reasons,
        )
    return TaskModerated(
        task=data.task,
        model=data.model,
        text=data.text,
        embedding=data.embedding,
        label=data.label,
        label_scores=data.label_scores,
        verdict=verdict.verdict,
        scores=verdict.scores,
        reasons=verdict.reasons,
    )
