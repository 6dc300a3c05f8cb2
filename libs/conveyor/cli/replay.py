"""`conveyor replay`: reprocess a stage's input from a time or an offset.

`--mode reset` (default) moves the stage's stopped consumer group back to `--from`; it is refused
while the group has members. `--mode republish` produces the records of [--from, --to) again
into the same input topics while the stage runs. Positions: digits are an offset (in every
partition), anything else a time (RFC 3339, or relative: `2h` = two hours ago). See
`conveyor.dlq.replay`.
"""

from __future__ import annotations

import argparse
import sys

from conveyor.cli.common import kafka_settings
from conveyor.dlq.records import TimeSpecError
from conveyor.errors import BrokerError


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True)
    parser.add_argument("--from", dest="start", required=True, help="time or offset (inclusive)")
    parser.add_argument("--to", dest="end", help="time or offset (exclusive); republish only")
    parser.add_argument("--mode", choices=["reset", "republish"], default="reset")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    parser.add_argument("--group", help="the stage's consumer group (default conveyor.<stage>)")
    parser.add_argument("--rate", type=float, default=None, help="republish: records per second")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from conveyor.dlq.replay import ReplayError

    try:
        return _run(args)
    except (ReplayError, TimeSpecError, ValueError) as exc:
        print(f"conveyor replay: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"conveyor replay: kafka failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from conveyor.dlq.replay import parse_position, plan, republish, reset

    if args.mode == "reset" and args.end:
        raise ValueError("--to applies to --mode republish; a reset re-consumes everything after")
    settings = kafka_settings()
    end = parse_position(args.end) if args.end else None
    replay = plan(settings, args.stage, parse_position(args.start), end, group=args.group)
    if args.mode == "reset":
        before = reset(settings, replay, dry_run=args.dry_run)
        for (topic, partition), (start, _) in sorted(replay.ranges.items()):
            committed = before.get((topic, partition), -1)
            print(
                f"{topic}[{partition}] committed={committed if committed >= 0 else 'none'} "
                f"-> {start}"
            )
        verb = "would reset" if args.dry_run else "reset"
        print(f"replay: {verb} group {replay.group} on {len(replay.ranges)} partitions")
        return 0
    for (topic, partition), (start, stop) in sorted(replay.ranges.items()):
        print(f"{topic}[{partition}] [{start}, {stop})")
    if args.dry_run:
        print(f"replay: would republish up to {replay.records} records")
        return 0
    count = republish(settings, replay, rate=args.rate)
    print(f"replay: republished {count} records")
    return 0
