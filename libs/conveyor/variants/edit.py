"""`conveyor variants set`: change a kind's weights (or shadow shares) in the models file.

The file stays the one source of truth: it is read as the JSON list it is, the named variants'
routing fields are changed, the whole list is validated exactly as the services will read it,
and only then written, atomically (a temporary file renamed over it), so a service reloading at
that moment reads the old list or the new one, never half of one. Fields other than `weight` and
`shadow` are never touched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.ml.registry import ModelSpec, parse_specs

SHADOW_PREFIX = "shadow:"


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`name=value` pairs; value is a weight (`90`) or a shadow share (`shadow:0.2`)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"expected name=weight or name=shadow:share, got {item!r}")
        out[name] = value
    return out


def apply_assignments(
    doc: list[dict[str, Any]], kind: str, assignments: Mapping[str, str]
) -> list[dict[str, Any]]:
    """A copy of the models list with the named variants of `kind` changed."""
    names = {str(entry.get("name")) for entry in doc if entry.get("kind") == kind}
    unknown = sorted(set(assignments) - names)
    if unknown:
        raise ValueError(f"no {kind} variant named {unknown}; configured: {sorted(names)}")
    out = []
    for entry in doc:
        entry = dict(entry)
        value = assignments.get(entry.get("name", "")) if entry.get("kind") == kind else None
        if value is not None:
            entry.update(_routing(value))
        out.append(entry)
    return out


def _routing(value: str) -> dict[str, Any]:
    try:
        if value.startswith(SHADOW_PREFIX):
            return {"shadow": float(value.removeprefix(SHADOW_PREFIX)), "weight": None}
        return {"weight": float(value), "shadow": 0.0}
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None


def set_variants(path: Path, kind: str, assignments: Mapping[str, str]) -> tuple[ModelSpec, ...]:
    """Change, validate and atomically rewrite the models file; returns the new specs."""
    doc = json.loads(path.read_text())
    if not isinstance(doc, list):
        raise ValueError(f"{path} is not a JSON list of models")
    new = apply_assignments(doc, kind, assignments)
    text = json.dumps(new, indent=2) + "\n"
    specs = parse_specs(text)  # refuse what the services would refuse
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return specs
