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

    if args.action == "start":
        status = state.start_detached()
    elif args.action == "stop":
        status = state.stop_detached()
    else:
        status = state.status_detached()
    print(status.describe() if hasattr(status, "describe") else status)
    return 0 if args.action == "stop" or status.running else 1
