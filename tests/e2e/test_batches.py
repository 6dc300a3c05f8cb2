"""Batch jobs end to end: the gateway and all five services as processes, the real broker, the
real packaged models, a real SQLite store, and `conveyor batch` as a user runs it.

A 300-task embed batch completes with the right counts and every result in input order (the
embeddings checked against the model run here); a batch cancelled midway ends with its unfinished
tasks `cancelled` and keeps them so once inference drains their records; a batch whose completion
window passes ends `expired` with its unfinished tasks; an interactive task submitted while a
batch twenty times the dispatch window runs completes while most of the batch is unfinished, and
the gateway never has more than the window of the batch's tasks in flight. To make "midway" and
"unfinished" certain rather than a race, inference is stopped at the point that matters and
started again.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.local.stack import LocalStack
from conveyor.net import free_ports
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV

pytestmark = [pytest.mark.broker, pytest.mark.models, pytest.mark.timeout(600)]

TOKEN = "tok-batch-acme"
WINDOW = 48  # the gateway's batch_in_flight here: small, so batches are many windows long
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Batches:
    """The running stack and an HTTP client of its gateway."""

    def __init__(self, stack: LocalStack, url: str, store_url: str) -> None:
        self.stack = stack
        self.url = url
        self.store_url = store_url
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=120)

    def submit(self, lines: list[dict[str, Any]], **params: str) -> dict[str, Any]:
        body = "\n".join(json.dumps(line) for line in lines).encode()
        answer = self.http.post(
            "/v1/batches",
            content=body,
            params=params,
            headers={"Content-Type": "application/jsonl"},
        )
        assert answer.status_code == 202, answer.text
        batch: dict[str, Any] = answer.json()
        return batch

    def get(self, batch_id: str) -> dict[str, Any]:
        answer = self.http.get(f"/v1/batches/{batch_id}")
        assert answer.status_code == 200, answer.text
        batch: dict[str, Any] = answer.json()
        return batch

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        answer = self.http.get(f"/v1/batches/{batch_id}/results")
        assert answer.status_code == 200, answer.text
        return [json.loads(line) for line in answer.text.splitlines()]

    def until(
        self, check: Callable[[], Any], what: str, timeout_s: float, *, supervise: bool = True
    ) -> Any:
        """`check()`'s first true value; `supervise=False` while a service is stopped on purpose."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if value := check():
                return value
            if supervise:
                assert not self.stack.supervise(), "a service died:\n" + self.logs()
            time.sleep(0.3)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.label}\n{p.tail(15)}" for p in self.stack.procs.values())


@pytest.fixture(scope="module")
def batches(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batches]:
    workdir = tmp_path_factory.mktemp("batches")
    store_url = f"sqlite:///{workdir / 'conveyor.db'}"
    (port,) = free_ports(1)
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": f"batches{os.getpid()}.",
        "CONVEYOR_STORE_URL": store_url,
        "CONVEYOR_GATEWAY_TOKENS": json.dumps({TOKEN: "acme"}),
        "CONVEYOR_GATEWAY_PORT": str(port),
        # The broker is shared with other runs on two cores.
        "CONVEYOR_PUBLISH_TIMEOUT_S": "60",
        "CONVEYOR_BATCH_IN_FLIGHT": str(WINDOW),
        **WEBHOOK_ENV,
        "OTEL_SDK_DISABLED": "true",
    }
    stack = LocalStack(workdir, env, services=("writeback", "notify", "moderation", "inference",
                                               "preprocess", "gateway"))  # fmt: skip
    stack.apply_topics()
    stack.start()
    try:
        yield Batches(stack, f"http://127.0.0.1:{port}", store_url)
    finally:
        stack.stop()


def embed_lines(tag: str, count: int) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"{tag}-{i}", "body": {"kind": "embed", "input": f"{tag} sentence {i}"}}
        for i in range(count)
    ]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embed_batch_completes_with_counts_and_results_in_input_order(
    batches: Batches, tmp_path: Path
) -> None:
    lines = embed_lines("alpha", 300)
    source = tmp_path / "batch.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "results.jsonl"
    cli = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.main", "batch", "--url", batches.url, "submit",
         str(source), "--poll-s", "0.5", "--results", str(out)],
        env={**os.environ, "CONVEYOR_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, (cli.stdout, cli.stderr, batches.logs())
    assert "[" + "#" * 30 + "] 300/300 completed 300" in cli.stderr, cli.stderr
    batch_id = cli.stdout.split()[1].rstrip(":")
    batch = batches.get(batch_id)
    assert batch["status"] == "completed"
    counts = batch["request_counts"]
    assert (counts["total"], counts["completed"]) == (300, 300)
    assert sum(v for k, v in counts.items() if k != "total") == 300
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in written] == [line["custom_id"] for line in lines]
    assert [line["id"] for line in written] == [f"{batch_id}.{n}" for n in range(1, 301)]
    assert all(line["status"] == "completed" and line["error"] is None for line in written)
    # Each result is its own line's embedding: the model, run here on a sample of inputs.
    from conveyor.ml.registry import ModelRegistry

    sample = [0, 1, 150, 299]
    expected = ModelRegistry().for_kind("embed").embed([lines[i]["body"]["input"] for i in sample])
    for i, vector in zip(sample, expected, strict=True):
        got = written[i]["response"]["body"]["result"]["embedding"]
        assert len(got) == 384 and cosine(got, vector) > 0.999, i


def test_batch_cancelled_midway_ends_its_unfinished_tasks_cancelled(batches: Batches) -> None:
    batch = batches.submit(embed_lines("beta", 400))
    batch_id = batch["id"]
    batches.until(
        lambda: batches.get(batch_id)["request_counts"]["completed"] >= 20,
        "20 tasks to complete",
        timeout_s=120,
    )
    # Stopped here, inference leaves most of the batch unrun: the cancel meets real work left.
    batches.stack.procs["inference"].stop()
    answer = batches.http.post(f"/v1/batches/{batch_id}/cancel")
    assert answer.status_code == 200, answer.text
    cancelled = answer.json()
    counts = cancelled["request_counts"]
    assert cancelled["status"] == "cancelled"
    assert counts["cancelled"] > 0 and counts["completed"] >= 20
    assert counts["completed"] + counts["cancelled"] == 400, counts
    # Inference comes back and drains the batch's records: they are skipped, and a result that
    # was already past inference loses to `cancelled`; nothing in the batch changes.
    batches.stack.procs["inference"].start()
    batches.stack.procs["inference"].wait_ready(300)
    time.sleep(5.0)  # let the drained records reach writeback, if any were to
    after = batches.get(batch_id)["request_counts"]
    assert after == counts
    lines = batches.results(batch_id)
    assert [line["custom_id"] for line in lines] == [f"beta-{i}" for i in range(400)]
    ended = [line for line in lines if line["status"] == "cancelled"]
    assert len(ended) == after["cancelled"]
    assert all(line["error"]["code"] == "cancelled" for line in ended)
    store = open_store(batches.store_url)
    try:
        task = store.get(ended[-1]["id"], tenant="acme")
    finally:
        store.close()
    assert task is not None and task.status == "cancelled"


def test_batch_past_its_completion_window_expires_its_unfinished_tasks(batches: Batches) -> None:
    # No inference: nothing of this batch can complete, so "unfinished" is certain.
    batches.stack.procs["inference"].stop()
    try:
        batch = batches.submit(embed_lines("gamma", 50), completion_window="3s")
        assert batch["status"] == "in_progress"
        expired = batches.until(
            lambda: (b := batches.get(batch["id"]))["status"] == "expired" and b,
            "the batch to expire",
            timeout_s=60,
            supervise=False,
        )
    finally:
        batches.stack.procs["inference"].start()
        batches.stack.procs["inference"].wait_ready(300)
    counts = expired["request_counts"]
    assert counts["expired"] == 50, counts
    lines = batches.results(batch["id"])
    assert all(line["error"]["code"] == "expired" for line in lines)
    assert "completion window 3s passed" in lines[0]["error"]["message"]


def in_flight(store_url: str) -> int:
    """Batch tasks the gateway has claimed or dispatched and not yet seen end (the store)."""
    path = store_url.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM batch_dispatch WHERE state IN ('claimed', 'dispatched')"
        ).fetchone()
    return int(count)


def test_interactive_task_during_a_batch_much_larger_than_the_window_is_not_queued_behind_it(
    batches: Batches,
) -> None:
    total = 20 * WINDOW
    batch_id = batches.submit(embed_lines("delta", total))["id"]
    batches.until(
        lambda: batches.get(batch_id)["request_counts"]["completed"] >= 1,
        "the batch to be running",
        timeout_s=180,
    )
    answer = batches.http.post("/v1/tasks", json={"kind": "embed", "input": "a question now"})
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["task_id"]
    peak = [0]

    def interactive_done() -> Any:
        peak[0] = max(peak[0], in_flight(batches.store_url))
        task = batches.http.get(f"/v1/tasks/{task_id}").json()
        return task["status"] == "completed" and task

    task = batches.until(interactive_done, "the interactive task to complete", timeout_s=240)
    assert len(task["result"]["embedding"]) == 384
    counts = batches.get(batch_id)["request_counts"]
    unfinished = counts["pending"] + counts["processing"] + counts["retrying"]
    # Behind at most a window of batch records at any stage, not behind the whole batch.
    assert unfinished > total // 2, counts
    assert 0 < peak[0] <= WINDOW, peak
    cancelled = batches.http.post(f"/v1/batches/{batch_id}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["request_counts"]["cancelled"] > 0
