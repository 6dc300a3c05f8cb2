"""Variant metrics on /metrics, labelled by kind and variant (role: primary or shadow).

Updated once per model group of a batch, never per record, like every other runtime metric.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEIGHT = Gauge(
    "conveyor_variant_share",
    "Configured share of a kind's tasks routed to the variant (shadow: sampled share)",
    ["kind", "variant"],
)
RECORDS = Counter(
    "conveyor_variant_records",
    "Records a variant ran in inference, by outcome (ok, error)",
    ["kind", "variant", "role", "outcome"],
)
MODEL_SECONDS = Histogram(
    "conveyor_variant_batch_seconds",
    "Model time of one batch group of a variant in inference",
    ["kind", "variant", "role"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def observe(kind: str, variant: str, *, shadow: bool, seconds: float, ok: int, errors: int) -> None:
    """One batch group's figures."""
    role = "shadow" if shadow else "primary"
    MODEL_SECONDS.labels(kind=kind, variant=variant, role=role).observe(seconds)
    if ok:
        RECORDS.labels(kind=kind, variant=variant, role=role, outcome="ok").inc(ok)
    if errors:
        RECORDS.labels(kind=kind, variant=variant, role=role, outcome="error").inc(errors)
