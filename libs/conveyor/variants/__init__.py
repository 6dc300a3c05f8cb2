"""Model variants: several models per task kind, routed by weight (A/B, canary) or as shadows.

A variant is a configured model (`conveyor.ml.registry.ModelSpec`) with routing fields: a weight,
an optional tenant pinning and, for a shadow, the share of tasks it gets a copy of. `table`
routes a task (pure: a hash of tenant and task id, so a retry or replay lands on the same
variant), `source` reads the configuration and reloads it when its file changes, `report`
compares the variants from the result store. docs/variants.md describes the whole feature.
"""

from __future__ import annotations

# CloudEvents extension attributes (lowercase letters only, as CloudEvents requires).
VARIANT = "variant"  # the variant that produced (or will produce) the event's result
SHADOWS = "shadows"  # on a primary task: the shadow variants that get a copy, comma-separated
SHADOW = "shadow"  # "true" on the events of a shadow copy: never the task's result
