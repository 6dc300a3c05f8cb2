"""The demo's example tasks: valid requests, ids fresh for every run."""

from __future__ import annotations

from conveyor.events.ingress import TaskRequest
from conveyor.local.demo import load_tasks
from conveyor.paths import repo_root

EXAMPLES = repo_root() / "examples" / "tasks.jsonl"


def test_every_run_gets_its_own_task_ids_and_the_receiver_as_callback() -> None:
    first = load_tasks(EXAMPLES, "http://127.0.0.1:9/hooks", "a1b2")
    second = load_tasks(EXAMPLES, "http://127.0.0.1:9/hooks", "c3d4")
    assert len(first) == len(second) == 10
    assert all(t["task_id"].endswith("-a1b2") for t in first)
    assert not {t["task_id"] for t in first} & {t["task_id"] for t in second}
    assert {t["callback_url"] for t in first} == {"http://127.0.0.1:9/hooks"}
    for task in first:
        TaskRequest.model_validate(task)
