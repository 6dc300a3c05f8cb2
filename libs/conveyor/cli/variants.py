"""`conveyor variants show|set|report`: model variants, their weights, and how they compare.

`show` prints the configured variants per kind with each one's share; `set <kind> name=weight
...` promotes or rolls back a canary (or `name=shadow:0.2` sets a shadow's sampled share) by
rewriting `CONVEYOR_MODELS_FILE`, which the services follow within a second, without a restart;
`report` compares the variants from the result store (docs/variants.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from conveyor.ml.registry import ModelSpec, load_specs


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="configured variants and their shares")
    show.add_argument("--file", help="models file (default: CONVEYOR_MODELS_FILE)")
    show.set_defaults(func=run_show)
    set_ = sub.add_parser("set", help="change weights: conveyor variants set embed a=90 b=10")
    set_.add_argument("kind", choices=["generate", "embed", "classify"])
    set_.add_argument("assignments", nargs="+", metavar="name=weight|name=shadow:share")
    set_.add_argument("--file", help="models file (default: CONVEYOR_MODELS_FILE)")
    set_.set_defaults(func=run_set)
    rep = sub.add_parser("report", help="compare variants from the result store")
    rep.add_argument("--kind", choices=["generate", "embed", "classify"])
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.set_defaults(func=run_report)


def _file(args: argparse.Namespace) -> str | None:
    return args.file or os.environ.get("CONVEYOR_MODELS_FILE") or None


def run_show(args: argparse.Namespace) -> int:
    path = _file(args)
    try:
        specs = load_specs(os.environ.get("CONVEYOR_MODELS"), path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    origin = path or ("CONVEYOR_MODELS" if os.environ.get("CONVEYOR_MODELS") else "defaults")
    print(f"variants from {origin}")
    print(show_table(specs))
    return 0


def show_table(specs: Sequence[ModelSpec]) -> str:
    from conveyor.variants.source import table_of

    table = table_of(specs)
    lines = [f"{'kind':<9}{'variant':<18}{'share':>11}  {'tenants':<16}{'dtype':<9}source"]
    for spec in specs:
        if spec.shadow:
            share = f"shadow {spec.shadow:.0%}"
        else:
            tenant = spec.tenants[0] if spec.tenants else ""
            share = f"{table.shares(spec.kind, tenant).get(spec.name, 0.0):.0%}"
        tenants = ",".join(spec.tenants) or "*"
        lines.append(
            f"{spec.kind:<9}{spec.name:<18}{share:>11}  {tenants:<16}{spec.dtype:<9}{spec.source}"
        )
    return "\n".join(lines)


def run_set(args: argparse.Namespace) -> int:
    from conveyor.variants.edit import parse_assignments, set_variants

    path = _file(args)
    if not path:
        print(
            "error: weights live in a models file: set CONVEYOR_MODELS_FILE (or --file); "
            "inline CONVEYOR_MODELS cannot change without a restart",
            file=sys.stderr,
        )
        return 2
    try:
        specs = set_variants(Path(path), args.kind, parse_assignments(args.assignments))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"updated {path}; services follow within a second")
    print(show_table([s for s in specs if s.kind == args.kind]))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from conveyor.cli.common import store_url
    from conveyor.store import open_store
    from conveyor.variants.report import format_json, format_table, report

    store = open_store(store_url())
    try:
        stats = report(store.variant_runs(kind=args.kind))
    finally:
        store.close()
    if not stats:
        print("no variant runs recorded yet", file=sys.stderr)
    print(format_json(stats) if args.json else format_table(stats))
    return 0
