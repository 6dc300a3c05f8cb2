"""`conveyor cancel <task id>`: cancel a task, as `DELETE /v1/tasks/{id}` does.

It works on the result store and the cluster directly, like `conveyor status`; `--tenant`
names whose task it is (needed when several tenants use the id). Exit codes: 0 cancelled (now
or already), 1 no such task, 2 the id is ambiguous, 3 the task finished first (nothing done).
"""

from __future__ import annotations

import argparse
import json
import sys

from conveyor.cli.common import kafka_settings, store_url

NOT_FOUND = 1
AMBIGUOUS = 2
FINISHED = 3


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id")
    parser.add_argument(
        "--tenant", help="the tenant whose task it is (needed when several use the id)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from conveyor.cancel import Canceller
    from conveyor.store import AmbiguousTaskError, open_store

    store = open_store(store_url())
    canceller = None
    try:
        try:
            task = store.get(args.task_id, tenant=args.tenant)
        except AmbiguousTaskError as exc:
            print(f"{exc}: use --tenant", file=sys.stderr)
            return AMBIGUOUS
        if task is None:
            print(f"task {args.task_id} not found (or another tenant's)", file=sys.stderr)
            return NOT_FOUND
        canceller = Canceller(kafka_settings(), store, by="cli")
        answer = canceller.cancel(task.task_id, task.tenant or "")
    finally:
        if canceller is not None:
            canceller.close()
        store.close()
    if answer is None:  # gone between the two reads: only a store wipe does that
        return NOT_FOUND
    view = answer.view()
    if args.json:
        print(json.dumps(view, indent=2))
    elif answer.cancelled:
        print(f"{view['task_id']} cancelled at {view['cancelled_at']}")
    else:
        print(f"{view['task_id']} already {view['status']}: nothing to cancel")
    return 0 if answer.cancelled else FINISHED
