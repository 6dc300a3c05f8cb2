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
from typing import Any

from conveyor.events.catalog import MODERATED_TYPE as MODERATED
from conveyor.events.model import Event
from conveyor.ml.policy import LEVELS, Verdict, decide
from conveyor.runtime import Emit, StageContext
from conveyor.runtime.handler import BatchOutcome
from conveyor.services.moderation.settings import ModerationSettings
from conveyor.telemetry.tracing import span

# The policy (thresholds -> verdict) is shared with inference's stream gate: conveyor.ml.policy.
__all__ = ["LEVELS", "MODERATED", "Verdict", "decide", "handle_batch"]


def handle_batch(
    events: Sequence[Event], ctx: StageContext[ModerationSettings]
) -> list[BatchOutcome]:
    texts = [_texts(event) for event in events]
    flat = [t for group in texts for t in group]
    results: dict[str, Any] = {}
    for signal in ctx.resources["signals"]:
        with span(f"classify {signal.name}", {"conveyor.texts": len(flat)}):
            results[signal.name] = signal.evaluate(flat)
    out: list[BatchOutcome] = []
    pos = 0
    for event, group in zip(events, texts, strict=True):
        worst = {
            name: max(rs[pos : pos + len(group)], key=lambda r: r.score)
            for name, rs in results.items()
        }
        pos += len(group)
        scores = {name: (r.score, r.reason) for name, r in worst.items()}
        out.append(_moderated(event, decide(scores, ctx.settings.thresholds)))
    return out


def _texts(event: Event) -> list[str]:
    data = event.data
    texts = [data["input"]]
    if data.get("text"):
        texts.append(data["text"])
    return texts


def _moderated(event: Event, verdict: Verdict) -> Emit:
    data: dict[str, Any] = event.data
    blocked = verdict.verdict == "block"
    return Emit(
        MODERATED,
        {
            "task": data["task"],
            "model": data["model"],
            "text": None if blocked else data.get("text"),
            "embedding": None if blocked else data.get("embedding"),
            "label": None if blocked else data.get("label"),
            "label_scores": {} if blocked else data.get("label_scores", {}),
            "verdict": verdict.verdict,
            "scores": verdict.scores,
            "reasons": verdict.reasons,
        },
    )
