"""Which variant serves a task: sticky weighted routing, tenant pinning and shadow sampling.

Pure functions of the configuration and the task's (tenant, task id), so every rule has a unit
test and a retry, a redelivery or a replay of the task is routed exactly as the first run was.
The point in [0, 1) a task hashes to is fixed; the weights lay the variants out along [0, 1) in
configuration order, so moving weight from one variant to the next moves only the tasks in the
band that changed hands (a 90/10 -> 50/50 promotion moves the tasks in [0.5, 0.9), nothing
else). A shadow's sample uses its own salt, so which tasks are shadowed does not depend on which
primary they were routed to.

Rules, per kind:
- a task that names its `model` is served by that variant (explicit beats weighted);
- a tenant named by some variant's `tenants` is served only by the variants pinned to it,
  weighted among themselves; every other tenant by the unpinned variants;
- among the candidates, weights decide; when no candidate has a weight, the first one in the
  configuration serves all (the behaviour before variants existed);
- a shadow variant (`shadow` > 0) is never a primary candidate; it gets a copy of the share
  `shadow` of the kind's tasks (of its pinned tenants only, when it has `tenants`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_SCALE = float(1 << 64)


@dataclass(frozen=True, slots=True)
class VariantRule:
    """The routing fields of one variant (a configured model of one kind)."""

    name: str
    kind: str
    weight: float | None = None  # None: not weighted (see the module rules)
    tenants: frozenset[str] = frozenset()  # pinned to these tenants; empty: everyone
    shadow: float = 0.0  # share of tasks copied to this shadow variant; 0: not a shadow

    @property
    def is_shadow(self) -> bool:
        return self.shadow > 0


@dataclass(frozen=True, slots=True)
class Route:
    """Where a task goes: its primary variant and the shadow variants that get a copy."""

    variant: str
    shadows: tuple[str, ...] = ()


def bucket(tenant: str, task_id: str, salt: str = "") -> float:
    """The task's fixed point in [0, 1): a hash of (tenant, task id, salt), length-prefixed so
    no spelling of one part can pass for another."""
    name = f"{len(tenant)}:{tenant}\x1f{len(task_id)}:{task_id}\x1f{salt}".encode()
    return int.from_bytes(hashlib.sha256(name).digest()[:8], "big") / _SCALE


class VariantTable:
    """The routing rules of every kind; immutable (a reload builds a new table)."""

    def __init__(self, rules: Iterable[VariantRule]) -> None:
        by_kind: dict[str, list[VariantRule]] = {}
        for rule in rules:
            by_kind.setdefault(rule.kind, []).append(rule)
        self._kinds: Mapping[str, tuple[VariantRule, ...]] = {
            kind: tuple(found) for kind, found in by_kind.items()
        }

    @property
    def kinds(self) -> Mapping[str, tuple[VariantRule, ...]]:
        return self._kinds

    def rules(self, kind: str) -> tuple[VariantRule, ...]:
        return self._kinds.get(kind, ())

    def route(
        self, kind: str, tenant: str, task_id: str, requested: str | None = None
    ) -> Route | None:
        """The task's route, or None when no variant of `kind` is configured."""
        rules = self._kinds.get(kind)
        if not rules:
            return None
        variant = requested or _weighted(_candidates(rules, tenant), bucket(tenant, task_id))
        shadows = tuple(
            rule.name
            for rule in rules
            if rule.is_shadow
            and rule.name != variant
            and (not rule.tenants or tenant in rule.tenants)
            and bucket(tenant, task_id, "shadow:" + rule.name) < rule.shadow
        )
        return Route(variant, shadows)

    def shares(self, kind: str, tenant: str = "") -> dict[str, float]:
        """Each primary candidate's share of `tenant`'s tasks of `kind` (sums to 1)."""
        candidates = _candidates(self._kinds.get(kind, ()), tenant)
        if not candidates:
            return {}
        weights = _weights(candidates)
        total = sum(weights)
        return {rule.name: weight / total for rule, weight in zip(candidates, weights, strict=True)}


def _candidates(rules: Iterable[VariantRule], tenant: str) -> list[VariantRule]:
    primaries = [rule for rule in rules if not rule.is_shadow]
    pinned = [rule for rule in primaries if tenant in rule.tenants]
    return pinned or [rule for rule in primaries if not rule.tenants]


def _weights(candidates: list[VariantRule]) -> list[float]:
    """Effective weights: unset counts 0 once any candidate has one; all unset or all zero: the
    first candidate takes everything."""
    weights = [rule.weight or 0.0 for rule in candidates]
    if sum(weights) <= 0:
        weights = [1.0] + [0.0] * (len(candidates) - 1)
    return weights


def _weighted(candidates: list[VariantRule], point: float) -> str:
    if not candidates:
        raise LookupError("no primary variant serves this tenant")
    weights = _weights(candidates)
    target = point * sum(weights)
    running = 0.0
    for rule, weight in zip(candidates, weights, strict=True):
        running += weight
        if target < running:
            return rule.name
    # Rounding can leave `target` a hair above the sum: the last variant with weight serves it.
    pairs = zip(reversed(candidates), reversed(weights), strict=True)
    return next(rule.name for rule, weight in pairs if weight > 0)
