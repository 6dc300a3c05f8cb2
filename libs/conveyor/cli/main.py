"""`conveyor`: run the pipeline locally, submit tasks, inspect them, manage topics and the broker.

Each subcommand lives in its own module and is imported only when used, so `conveyor status`
does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from conveyor.paths import restrict_new_files

# subcommand -> (module under conveyor.cli, one-line help)
COMMANDS = {
    "broker": ("broker", "start, stop or show the local single-node Kafka broker"),
    "topics": ("topics", "create every topic the catalog names (idempotent)"),
    "run": ("run", "run one stage service in this process"),
    "up": ("up", "start the broker, topics and every service; --demo submits examples"),
    "submit": ("tasks", "submit tasks from a JSONL file or arguments"),
    "status": ("tasks", "show a task's status, timeline and result"),
    "batch": ("batch", "submit, follow, cancel and collect batch jobs (through the gateway)"),
    "cancel": ("cancel", "cancel a task (idempotent; a finished task is left as it is)"),
    "trace": ("trace", "print a task's trace id and its Jaeger UI link"),
    "models": ("models", "prepare the packaged models (convert once into the cache)"),
    "dlq": ("dlq", "list, show or redrive dead letters"),
    "replay": ("replay", "reprocess a stage's input from a time or offset"),
    "retention": ("retention", "sweep what retention has expired (results, timelines)"),
    "variants": ("variants", "show, set (canary weights) or report model variants"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"conveyor.cli.{module}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        mod.configure(name, cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    restrict_new_files()  # databases, logs, broker data and state under var/: owner only
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
