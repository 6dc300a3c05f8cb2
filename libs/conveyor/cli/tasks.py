"""`conveyor submit` and `conveyor status`: send tasks to a running pipeline and look them up."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from conveyor.cli.common import kafka_settings, store_url
from conveyor.errors import PermanentError


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    if name == "submit":
        parser.add_argument("file", nargs="?", type=Path, help="JSONL file, one task per line")
        parser.add_argument("--kind", choices=["generate", "embed", "classify"])
        parser.add_argument("--input", help="the task's input text")
        parser.add_argument("--tenant", default="default")
        parser.add_argument("--template")
        parser.add_argument("--priority", choices=["high", "normal", "low"], default="normal")
        parser.add_argument("--callback-url")
        parser.add_argument("--label", action="append", dest="labels", default=[])
        parser.add_argument("--model", help="a configured model of the kind")
        parser.add_argument(
            "--param",
            action="append",
            dest="params",
            default=[],
            metavar="NAME=VALUE",
            help="a parameter of the kind, e.g. max_new_tokens=32 (checked before sending)",
        )
        parser.set_defaults(func=submit)
    else:
        parser.add_argument("task_id")
        parser.add_argument(
            "--tenant", help="the tenant whose task it is (needed when several use the id)"
        )
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=status)


def _tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.file:
        return [json.loads(line) for line in args.file.read_text().splitlines() if line.strip()]
    if not (args.kind and args.input):
        raise SystemExit("give a JSONL file, or --kind and --input")
    task: dict[str, Any] = {
        "tenant": args.tenant,
        "kind": args.kind,
        "input": args.input,
        "priority": args.priority,
    }
    if args.params:
        task["params"] = dict(_param(text) for text in args.params)
    for key in ("template", "callback_url", "model"):
        if getattr(args, key):
            task[key] = getattr(args, key)
    if args.labels:
        task["labels"] = args.labels
    return [task]


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--param {text!r}: give NAME=VALUE")
    return name.strip(), value.strip()


def submit(args: argparse.Namespace) -> int:
    from conveyor.client import TaskClient
    from conveyor.settings import CatalogSettings
    from conveyor.telemetry.tracing import shutdown_tracing

    tasks = _tasks(args)
    # The same templates and models as the pipeline (CONVEYOR_TEMPLATES, CONVEYOR_MODELS).
    rules = CatalogSettings().task_rules()
    client = TaskClient(kafka_settings(), source="/conveyor/cli", rules=rules)
    bad = 0
    for n, task in enumerate(tasks, 1):
        try:
            task_id, trace_id = client.submit(task)
            print(f"{task_id}\ttrace={trace_id or '-'}")
        except PermanentError as exc:
            bad += 1
            print(f"line {n}: {exc}", file=sys.stderr)
        if sys.stderr.isatty() and len(tasks) > 1:
            done = int(40 * n / len(tasks))
            print(f"\r[{'#' * done}{'.' * (40 - done)}] {n}/{len(tasks)}", end="", file=sys.stderr)
    try:
        client.flush()
    finally:
        shutdown_tracing()  # the last submit spans leave before the process does
    if sys.stderr.isatty() and len(tasks) > 1:
        print(file=sys.stderr)
    print(f"submitted {len(tasks) - bad}, rejected {bad}", file=sys.stderr)
    return 1 if bad else 0


def status(args: argparse.Namespace) -> int:
    from conveyor.store import AmbiguousTaskError, open_store

    store = open_store(store_url())
    try:
        try:
            record = store.get(args.task_id, tenant=args.tenant)
        except AmbiguousTaskError as exc:
            print(f"{exc}: use --tenant", file=sys.stderr)
            return 2
        if record is None:
            expired_at = store.expired_at(args.task_id, tenant=args.tenant)
            if expired_at is not None:
                print(
                    f"task {args.task_id} expired at {expired_at.isoformat()}: its result and "
                    "timeline were deleted under the retention policy",
                    file=sys.stderr,
                )
                return 1
            print(
                f"task {args.task_id} not found (not yet stored, or another tenant's)",
                file=sys.stderr,
            )
            return 1
        timeline = store.timeline(args.task_id, tenant=record.tenant or "")
    finally:
        store.close()
    doc = {
        "task_id": record.task_id,
        "tenant": record.tenant,
        "kind": record.kind,
        "status": record.status,
        "stage": record.stage,
        "verdict": record.verdict,
        "trace_id": record.trace_id,
        "error": record.error,
        "result": record.result,
        "moderation": record.moderation,
        "timeline": [
            {"time": e.time.isoformat(), "status": e.status, "stage": e.stage, "detail": e.detail}
            for e in timeline
        ],
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    for key in ("task_id", "tenant", "kind", "status", "stage", "verdict", "trace_id", "error"):
        if doc[key] is not None:
            print(f"{key:<9} {doc[key]}")
    if record.result is not None:
        print(f"result    {json.dumps(record.result)[:300]}")
    print("timeline")
    for row in doc["timeline"]:
        print(
            f"  {row['time']}  {row['status']:<10} {row['stage'] or '-':<11} {row['detail'] or ''}"
        )
    return 0
