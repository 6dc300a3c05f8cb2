"""`conveyor trace <task id>`: the task's trace id and where to see the trace in Jaeger.

The trace id is the one the result store recorded for the task (writeback takes it from the
events' `traceparent`), so this works for any task that reached writeback, without asking the
tracing backend. The Jaeger UI base URL is `CONVEYOR_JAEGER_URL` (default
http://127.0.0.1:16686, Jaeger's own default port); the link is `<base>/trace/<trace id>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from conveyor.cli.common import store_url

DEFAULT_JAEGER_URL = "http://127.0.0.1:16686"


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id")
    parser.add_argument(
        "--tenant", help="the tenant whose task it is (needed when several use the id)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=show)


def jaeger_link(trace_id: str) -> str:
    base = os.environ.get("CONVEYOR_JAEGER_URL") or DEFAULT_JAEGER_URL
    return f"{base.rstrip('/')}/trace/{trace_id}"


def show(args: argparse.Namespace) -> int:
    from conveyor.store import AmbiguousTaskError, open_store

    store = open_store(store_url())
    try:
        record = store.get(args.task_id, tenant=args.tenant)
    except AmbiguousTaskError as exc:
        print(f"{exc}: use --tenant", file=sys.stderr)
        return 2
    finally:
        store.close()
    if record is None:
        print(
            f"task {args.task_id} not found (not yet stored, or another tenant's)", file=sys.stderr
        )
        return 1
    if not record.trace_id:
        print(
            f"task {args.task_id} has no trace id (it was submitted without trace context "
            "and tracing is off)",
            file=sys.stderr,
        )
        return 1
    link = jaeger_link(record.trace_id)
    if args.json:
        print(json.dumps({"task_id": record.task_id, "trace_id": record.trace_id, "url": link}))
    else:
        print(f"trace_id  {record.trace_id}")
        print(f"jaeger    {link}")
    return 0
