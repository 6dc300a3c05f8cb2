"""Where the variant table comes from, and its restart-free reload.

The variants are the configured models (`ModelSpec`, one source of truth): inline in
`CONVEYOR_MODELS`, or in the file `CONVEYOR_MODELS_FILE`. When they come from the file, the
routing fields (`weight`, `tenants`, `shadow`) of the variants a process started with follow
the file: `current()` looks at the file's identity (inode, size, mtime) at most every
`reload_s` seconds — one `stat` — and re-reads it when that changed. Models the process did
not start with are left out (it has not loaded them; adding a variant is a restart), and a file
that does not parse leaves the last good table in force, with one error logged per change of
the file: a typo in a canary's weight never stops routing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from conveyor.ml.registry import ModelSpec, load_specs
from conveyor.variants.metrics import WEIGHT
from conveyor.variants.table import Route, VariantRule, VariantTable

log = logging.getLogger(__name__)

# A weight change is in force within a second; one stat() per second costs nothing.
DEFAULT_RELOAD_S = 1.0
Stamp = tuple[int, int, int] | None


def table_of(specs: Iterable[ModelSpec]) -> VariantTable:
    """The routing rules of `specs`."""
    return VariantTable(
        VariantRule(
            name=spec.name,
            kind=spec.kind,
            weight=spec.weight,
            tenants=frozenset(spec.tenants),
            shadow=spec.shadow,
        )
        for spec in specs
    )


class VariantSource:
    """The current `VariantTable`, reloaded from the models file when it changes."""

    def __init__(
        self,
        models: str | None,
        models_file: str | None = None,
        *,
        reload_s: float = DEFAULT_RELOAD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        specs = load_specs(models, models_file)
        self._known = frozenset((spec.kind, spec.name) for spec in specs)
        self._table = table_of(specs)
        self._file = Path(models_file) if models_file else None
        self._stamp = self._file_stamp()
        self._reload_s = reload_s
        self._clock = clock
        self._next_check = clock() + reload_s
        _export(self._table)

    @property
    def reloadable(self) -> bool:
        return self._file is not None

    def current(self) -> VariantTable:
        if self._file is not None and self._clock() >= self._next_check:
            self._next_check = self._clock() + self._reload_s
            self._check()
        return self._table

    def route(
        self, kind: str, tenant: str, task_id: str, requested: str | None = None
    ) -> Route | None:
        return self.current().route(kind, tenant, task_id, requested)

    def _file_stamp(self) -> Stamp:
        if self._file is None:
            return None
        try:
            st = os.stat(self._file)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _check(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return  # unchanged, or briefly absent while being replaced: keep the table
        self._stamp = stamp
        try:
            specs = load_specs(None, str(self._file))
        except ValueError as exc:
            log.error("variants not reloaded file=%s error=%s", self._file, exc)
            return
        kept = [spec for spec in specs if (spec.kind, spec.name) in self._known]
        added = sorted(f"{s.kind}/{s.name}" for s in specs if (s.kind, s.name) not in self._known)
        if added:
            log.warning("variants not loaded by this process, restart to add them: %s", added)
        self._table = table_of(kept)
        _export(self._table)
        log.info("variants reloaded file=%s %s", self._file, describe(self._table))


def describe(table: VariantTable) -> str:
    """One log-friendly line: kind=name:weight,... per kind."""
    parts = []
    for kind, rules in sorted(table.kinds.items()):
        shares = table.shares(kind)
        cells = [
            f"{r.name}:shadow {r.shadow:g}"
            if r.is_shadow
            else f"{r.name}:{shares.get(r.name, 0):.0%}"
            for r in rules
        ]
        parts.append(f"{kind}={','.join(cells)}")
    return " ".join(parts)


def _export(table: VariantTable) -> None:
    """Each variant's share on /metrics (`conveyor_variant_share`), so a dashboard shows a
    canary's step next to its error rate."""
    for kind, rules in table.kinds.items():
        shares = table.shares(kind)
        for rule in rules:
            WEIGHT.labels(kind=kind, variant=rule.name).set(
                rule.shadow if rule.is_shadow else shares.get(rule.name, 0.0)
            )
