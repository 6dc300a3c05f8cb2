"""`conveyor variants report`: how each variant does, from the store's `variant_runs` alone.

Per (kind, variant, role): runs, model time p50/p95 (its share of its inference batch), end-to-end
p50/p95 (submitted to moderated), error rate (runs dead-lettered in inference or moderation, over
finished runs), moderation block rate (over runs moderation saw), and, for a shadow, agreement
with the primary on the same tasks: mean cosine similarity of the embeddings (embed) or the
share of equal labels (classify), over the tasks where both outputs are stored.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from conveyor.store.variantruns import VariantRun


@dataclass(frozen=True, slots=True)
class VariantStats:
    kind: str
    variant: str
    role: str  # primary | shadow
    runs: int
    finished: int
    failed: int
    blocked: int
    model_ms_p50: float | None
    model_ms_p95: float | None
    e2e_ms_p50: float | None
    e2e_ms_p95: float | None
    error_rate: float | None
    block_rate: float | None
    agreement: float | None  # shadow only: mean cosine (embed) or label agreement (classify)
    compared: int  # tasks the agreement is computed over

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.role, self.variant)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def agreement(kind: str, shadow: object, primary: object) -> float | None:
    """How far a shadow's result agrees with the primary's (None: not comparable)."""
    if not isinstance(shadow, dict) or not isinstance(primary, dict):
        return None
    if kind == "embed" and shadow.get("embedding") and primary.get("embedding"):
        if len(shadow["embedding"]) != len(primary["embedding"]):
            return None  # two models of different widths: no cosine between them
        return cosine(shadow["embedding"], primary["embedding"])
    if kind == "classify" and "label" in shadow and "label" in primary:
        return 1.0 if shadow["label"] == primary["label"] else 0.0
    return None


def report(runs: Iterable[VariantRun]) -> list[VariantStats]:
    """One row per (kind, variant, role), primaries first."""
    runs = list(runs)
    primaries = {(r.tenant, r.task_id): r for r in runs if not r.shadow}
    groups: dict[tuple[str, str, bool], list[VariantRun]] = defaultdict(list)
    for run in runs:
        groups[(run.kind or "unknown", run.variant, run.shadow)].append(run)
    out = [
        _stats(kind, variant, shadow, group, primaries)
        for (kind, variant, shadow), group in groups.items()
    ]
    return sorted(out, key=lambda s: s.key)


def _stats(
    kind: str,
    variant: str,
    shadow: bool,
    runs: list[VariantRun],
    primaries: dict[tuple[str | None, str], VariantRun],
) -> VariantStats:
    finished = [r for r in runs if r.finished]
    failed = sum(r.status == "failed" for r in finished)
    moderated = [r for r in finished if r.status in ("completed", "blocked")]
    blocked = sum(r.status == "blocked" for r in moderated)
    model_ms = [r.inference_ms for r in runs if r.inference_ms is not None]
    e2e_ms = [
        (r.finished_at - r.submitted_at).total_seconds() * 1000
        for r in moderated
        if r.finished_at is not None and r.submitted_at is not None
    ]
    scores: list[float] = []
    if shadow:
        for run in runs:
            primary = primaries.get((run.tenant, run.task_id))
            score = agreement(kind, run.result, primary.result) if primary is not None else None
            if score is not None:
                scores.append(score)
    return VariantStats(
        kind=kind,
        variant=variant,
        role="shadow" if shadow else "primary",
        runs=len(runs),
        finished=len(finished),
        failed=failed,
        blocked=blocked,
        model_ms_p50=percentile(model_ms, 50),
        model_ms_p95=percentile(model_ms, 95),
        e2e_ms_p50=percentile(e2e_ms, 50),
        e2e_ms_p95=percentile(e2e_ms, 95),
        error_rate=failed / len(finished) if finished else None,
        block_rate=blocked / len(moderated) if moderated else None,
        agreement=sum(scores) / len(scores) if scores else None,
        compared=len(scores),
    )


_HEADER = (
    f"{'kind':<9}{'variant':<18}{'role':<8}{'runs':>6}{'model p50/p95 ms':>19}"
    f"{'e2e p50/p95 ms':>21}{'errors':>8}{'blocked':>9}{'agreement':>20}"
)


def format_table(stats: Sequence[VariantStats]) -> str:
    lines = [_HEADER, "-" * len(_HEADER)]
    for s in stats:
        lines.append(
            f"{s.kind:<9}{s.variant:<18}{s.role:<8}{s.runs:>6}"
            f"{_pair(s.model_ms_p50, s.model_ms_p95):>19}{_pair(s.e2e_ms_p50, s.e2e_ms_p95):>21}"
            f"{_pct(s.error_rate):>8}{_pct(s.block_rate):>9}{_agreement(s):>20}"
        )
    return "\n".join(lines)


def format_json(stats: Sequence[VariantStats]) -> str:
    return json.dumps([asdict(s) for s in stats], indent=2)


def _pair(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a:.1f}/{b:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _agreement(s: VariantStats) -> str:
    if s.agreement is None:
        return "-"
    measure = "cos" if s.kind == "embed" else "agree"
    return f"{measure} {s.agreement:.5f} n={s.compared}"
