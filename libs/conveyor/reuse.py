"""Result reuse: a task identical to one already run in the same tenant takes its stored result.

Identical means the same reuse key (`reuse_key`): kind, model, variant, the normalised input
(the prompt after its template for `generate`, the candidate labels for `classify`) and the
parameters that change the output, normalised (types from the params models; greedy decoding
ignores seed, temperature and top_p). Only deterministic work is reused: embed, classify, and
generate when greedy (`do_sample` false) or seeded. A task opts out with `params.cache: false`,
an operator re-run (`rerun`) always runs the model, and the deployment switches reuse on with
`CONVEYOR_REUSE=true` (off by default: it makes inference use the result store).

Inference asks the store once per batch (`ReuseCache.begin`): identical tasks within the batch
run once (`coalesced`); a key with a stored result is a `hit` (the model is not run); a key
claimed by an identical task still running elsewhere is a `wait`: the record is retried through
the stage's retry ladder and finds the result on a later rung, and on the last rung it runs
itself, so a wait is bounded by the ladder and a crashed claimant (its claim lapses after
`reuse_lease_s`) blocks nobody. After the model ran, `ReuseCache.finish` stores the results
(for `reuse_ttl_s`, never beyond the tenant's retention) and drops failed claims. The model's
output is what is kept: moderation, writeback and notify still run for every task, so each has
its own id, row, timeline, verdict and webhook. A store fault never fails a task: reuse is
skipped for that batch. Details: docs/reuse.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field

from conveyor.errors import RetryableError
from conveyor.events.model import RERUN, Event
from conveyor.events.params import InvalidParamsError, parse_params
from conveyor.retention import RetentionSettings
from conveyor.store import ResultStore, ReuseClaim, ReuseEntry
from conveyor.store.base import REUSE_HIT, REUSE_WAIT
from conveyor.telemetry.metrics import REUSE_LOOKUPS

log = logging.getLogger(__name__)

# Bump when the key material changes meaning: old entries then simply miss.
KEY_VERSION = 1
# Lookup outcomes (the `outcome` label of conveyor_reuse_lookups_total).
HIT, COALESCED, WAIT, MISS, BYPASS = "hit", "coalesced", "wait", "miss", "bypass"
# Extension attribute on an inferred event whose result was reused (writeback's timeline says so).
REUSED = "reused"


class ReuseSettings(RetentionSettings):
    """Result reuse (`CONVEYOR_*`); read by inference."""

    reuse: bool = Field(
        default=False,
        description="reuse the stored result of an identical deterministic task of the same "
        "tenant instead of running the model (needs the result store: CONVEYOR_STORE_URL)",
    )
    reuse_ttl_s: float = Field(
        default=86_400.0, gt=0, description="seconds a result stays reusable (capped by retention)"
    )
    reuse_lease_s: float = Field(
        default=120.0,
        gt=0,
        description="seconds an identical task in flight holds its key; a longer-running or "
        "crashed one is taken over",
    )


def reuse_key(data: Mapping[str, Any], *, model: str, variant: str = "") -> str | None:
    """The reuse key of a preprocessed task, or None when it must run (not deterministic,
    `cache: false`, or parameters inference will refuse anyway).

    `variant` is the model variant serving the task (A/B, canary): "" until variants exist;
    the variant router passes its choice here so two variants never share results.
    """
    task = data["task"]
    kind = task["kind"]
    try:
        typed = parse_params(kind, task.get("params") or {})
    except InvalidParamsError:
        return None
    if typed is None or not typed.cache:
        return None
    material: dict[str, Any] = {"v": KEY_VERSION, "kind": kind, "model": model, "variant": variant}
    if kind == "generate":
        if typed.do_sample and typed.seed is None:
            return None  # sampling without a seed: every run may differ
        material["prompt"] = data["prompt"]
        material["max_new_tokens"] = typed.max_new_tokens
        if typed.do_sample:  # greedy decoding ignores these, so they must not split keys
            material.update(temperature=typed.temperature, top_p=typed.top_p, seed=typed.seed)
    elif kind == "classify":
        material["input"] = data["input"]
        material["labels"] = _labels(data, typed.labels)
    else:
        material["input"] = data["input"]
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _labels(data: Mapping[str, Any], param: str | None) -> list[str]:
    # The labels inference will use: the task's list, else the comma-separated parameter.
    labels = list(data.get("labels") or [])
    if not labels and param:
        labels = [label.strip() for label in param.split(",") if label.strip()]
    return [label.strip() for label in labels]


@dataclass(frozen=True, slots=True)
class Reused:
    """A stored result taken for a record: the model that made it and the task it came from."""

    model: str
    result: Mapping[str, Any]
    source_task_id: str


@dataclass(slots=True)
class ReusePlan:
    """What `ReuseCache.begin` decided for a batch's records (by index in the batch)."""

    reused: dict[int, Reused] = field(default_factory=dict)
    waiting: dict[int, BaseException] = field(default_factory=dict)
    followers: dict[int, int] = field(default_factory=dict)  # index -> index that runs for it
    leaders: dict[int, ReuseClaim] = field(default_factory=dict)  # runs, then stores its result
    claimed: set[int] = field(default_factory=set)  # leaders that hold their key's claim

    def settled(self, i: int) -> bool:
        """Whether record `i` needs no model run of its own."""
        return i in self.reused or i in self.waiting or i in self.followers


class ReuseCache:
    """Result reuse for one inference process, on the shared result store."""

    def __init__(self, store: ResultStore, settings: ReuseSettings, *, rungs: int) -> None:
        self.store = store
        self.settings = settings
        self.rungs = rungs  # retry rungs: a record on the last one runs instead of waiting

    def begin(self, items: Sequence[tuple[int, Event, str]], *, variant: str = "") -> ReusePlan:
        """Plan the records `items` = (index, event, model name) of one batch."""
        plan = ReusePlan()
        first: dict[tuple[str, str], int] = {}
        kinds: dict[int, str] = {}
        for i, event, model in items:
            kind = event.data["task"]["kind"]
            kinds[i] = kind
            key = None if event.ext(RERUN) else reuse_key(event.data, model=model, variant=variant)
            if key is None:
                REUSE_LOOKUPS.labels("inference", kind, BYPASS).inc()
                continue
            tenant = event.data["task"]["tenant"]
            leader = first.setdefault((tenant, key), i)
            if leader != i:
                plan.followers[i] = leader
                REUSE_LOOKUPS.labels("inference", kind, COALESCED).inc()
                continue
            plan.leaders[i] = ReuseClaim(tenant, key, event.data["task"]["task_id"])
        if not plan.leaders:
            return plan
        order = list(plan.leaders)
        try:
            found = self.store.reuse_begin(
                [plan.leaders[i] for i in order], lease_s=self.settings.reuse_lease_s
            )
        except Exception as exc:  # reuse is an optimisation: the batch runs without the store
            log.warning("result reuse lookup failed; running the batch without it: %s", exc)
            for i in order:  # identical records of the batch still run once
                REUSE_LOOKUPS.labels("inference", kinds[i], MISS).inc()
            return plan
        events = {i: event for i, event, _ in items}
        for i, lookup in zip(order, found, strict=True):
            if lookup.outcome == REUSE_HIT and lookup.model is not None:
                del plan.leaders[i]
                plan.reused[i] = Reused(lookup.model, lookup.result, lookup.task_id)
                REUSE_LOOKUPS.labels("inference", kinds[i], HIT).inc()
            elif lookup.outcome == REUSE_WAIT and events[i].attempt < self.rungs:
                del plan.leaders[i]
                plan.waiting[i] = RetryableError(
                    f"identical task {lookup.task_id} is running: waiting to reuse its result"
                )
                REUSE_LOOKUPS.labels("inference", kinds[i], WAIT).inc()
            else:  # claimed, or a wait on the last rung: run it here
                if lookup.outcome != REUSE_WAIT:
                    plan.claimed.add(i)
                REUSE_LOOKUPS.labels("inference", kinds[i], MISS).inc()
        for i, leader in plan.followers.items():  # identical records share their leader's fate
            if leader in plan.reused:
                plan.reused[i] = plan.reused[leader]
            elif leader in plan.waiting:
                plan.waiting[i] = plan.waiting[leader]
        return plan

    def finish(
        self, plan: ReusePlan, results: Mapping[int, Any], models: Mapping[int, str]
    ) -> None:
        """Store the leaders' results (`results[i]`: a result dict or the exception it raised)
        and drop the claims of those that failed."""
        if not plan.leaders:
            return
        now = datetime.now(UTC)
        entries, released = [], []
        for i, claim in plan.leaders.items():
            result = results.get(i)
            if isinstance(result, Mapping):
                until = now + timedelta(seconds=self._ttl_s(claim.tenant))
                entries.append(ReuseEntry(claim, models[i], dict(result), until))
            elif i in plan.claimed:
                released.append(claim)
        try:
            self.store.reuse_finish(entries, released)
        except Exception as exc:  # the results are emitted anyway; identical tasks will run
            log.warning("result reuse store failed; results not kept for reuse: %s", exc)

    def _ttl_s(self, tenant: str) -> float:
        retain = self.settings.retain_s(tenant)
        ttl = self.settings.reuse_ttl_s
        return ttl if retain is None else min(ttl, retain)
