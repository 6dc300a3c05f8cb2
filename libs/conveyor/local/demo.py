"""The demo: submit the example tasks to a running local stack, follow them, print results.

Every task gets the local webhook receiver as its `callback_url`, so the table shows the
notification each task produced and whether its signature verified. Each run suffixes the
example task ids with a fresh tag (`demo-embed-1-3f9a`): task ids are idempotency keys, so a
second run with the same ids would find them stored and notified already, and rightly do
nothing.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from conveyor.client import TaskClient
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.stack import LocalStack
from conveyor.settings import KafkaSettings
from conveyor.store import TaskRecord, open_store


def load_tasks(path: Path, callback_url: str, run: str) -> list[dict[str, Any]]:
    """The example tasks, each id suffixed with `run`, notifying `callback_url`."""
    tasks = []
    for line in path.read_text().splitlines():
        if line.strip():
            task = json.loads(line)
            task["task_id"] = f"{task['task_id']}-{run}"
            task.setdefault("callback_url", callback_url)
            tasks.append(task)
    return tasks


def run_demo(
    stack: LocalStack,
    tasks_file: Path,
    store_url: str,
    webhook_secrets: Mapping[str, str],
    stopping: Callable[[], bool],
    *,
    timeout_s: float,
) -> bool:
    receiver = WebhookReceiver(webhook_secrets).start()
    try:
        tasks = load_tasks(tasks_file, receiver.url, secrets.token_hex(2))
        client = TaskClient(
            KafkaSettings(kafka_bootstrap=stack.env["CONVEYOR_KAFKA_BOOTSTRAP"]),
            source="/conveyor/demo",
        )
        ids = client.submit_many(tasks)
        print(f"submitted {len(ids)} tasks from {tasks_file.name}", flush=True)
        records = _follow(stack, store_url, ids, receiver, stopping, timeout_s)
        print_table(ids, records, receiver)
        done = sum(1 for r in records.values() if r.terminal)
        notified = {d.task_id for d in receiver.snapshot()}
        return done == len(ids) and notified >= set(ids)
    finally:
        receiver.stop()


def _follow(
    stack: LocalStack,
    store_url: str,
    ids: list[str],
    receiver: WebhookReceiver,
    stopping: Callable[[], bool],
    timeout_s: float,
) -> dict[str, TaskRecord]:
    store = open_store(store_url)
    records: dict[str, TaskRecord] = {}
    deadline = time.monotonic() + timeout_s
    last = ""
    try:
        while time.monotonic() < deadline and not stopping():
            stack.supervise()
            records = {i: r for i in ids if (r := store.get(i)) is not None}
            done = sum(1 for r in records.values() if r.terminal)
            notified = len({d.task_id for d in receiver.snapshot()} & set(ids))
            line = f"progress: {done}/{len(ids)} done, {notified}/{len(ids)} notified"
            if line != last:
                print(line, flush=True)
                last = line
            if done == len(ids) and notified == len(ids):
                break
            time.sleep(0.5)
    finally:
        store.close()
    return records


def summary(record: TaskRecord | None) -> str:
    if record is None:
        return "(not in the store)"
    if record.status == "blocked":
        return "withheld: " + "; ".join((record.moderation or {}).get("reasons", []))[:60]
    if record.error:
        return record.error[:70]
    result = record.result or {}
    if "text" in result:
        return repr(" ".join(str(result["text"]).split())[:60])
    if "embedding" in result:
        vec = result["embedding"]
        return f"{len(vec)}-d embedding [{vec[0]:+.3f}, {vec[1]:+.3f}, ...]"
    if "label" in result:
        return f"label={result['label']} ({result['label_scores'][result['label']]:.2f})"
    return "-"


def print_table(ids: list[str], records: dict[str, TaskRecord], receiver: WebhookReceiver) -> None:
    hooks = {d.task_id: d for d in receiver.snapshot()}
    print()
    print(f"{'task':<21} {'kind':<9} {'status':<10} {'verdict':<8} {'webhook':<9} result")
    print("-" * 100)
    for task_id in ids:
        r = records.get(task_id)
        hook = hooks.get(task_id)
        hook_text = ("signed" if hook.signature_ok else "BAD SIG") if hook else "-"
        print(
            f"{task_id:<21} {(r.kind if r else '-') or '-':<9} {(r.status if r else '-'):<10} "
            f"{(r.verdict if r and r.verdict else '-'):<8} {hook_text:<9} {summary(r)}"
        )
    print()
