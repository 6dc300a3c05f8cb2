"""`conveyor broker start|stop|status|jars`: the local single-node Kafka broker for people."""

from __future__ import annotations

import argparse


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status", "jars"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "jars":
        from conveyor.broker.jars import ensure_jars

        print(f"kafka jars in {ensure_jars()}")
        return 0
    from conveyor.broker import state

    if args.action == "stop":
        print(state.stop_detached().describe())
        return 0
    status = state.start_detached() if args.action == "start" else state.status_detached()
    print(status.describe())
    return 0 if status.running else 1
