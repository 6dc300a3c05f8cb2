"""`conveyor topics apply`: create the catalog's topics, retry rungs and dead-letter topics."""

from __future__ import annotations

import argparse

from conveyor.cli.common import kafka_settings
from conveyor.topology import apply_topics, planned_topics


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["apply", "plan"])
    parser.add_argument("--partitions", type=int, default=None, help="default: the catalog's")
    parser.add_argument("--rungs", type=int, default=3, help="retry rungs per stage")
    parser.add_argument("--replication", type=int, default=-1, help="-1: the broker's default")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = kafka_settings()
    if args.action == "plan":
        from conveyor.events.catalog import load_catalog

        for plan in planned_topics(
            load_catalog(),
            prefix=settings.topic_prefix,
            rungs=args.rungs,
            partitions=args.partitions,
        ):
            print(f"{plan.name}\tpartitions={plan.partitions}")
        return 0
    created = apply_topics(
        settings, rungs=args.rungs, partitions=args.partitions, replication=args.replication
    )
    print(f"created {len(created)} topics" + (": " + ", ".join(created) if created else ""))
    return 0
