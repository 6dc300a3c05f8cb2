"""Cancellation through every service as a process: the gateway, the five stages, the real
broker, the real models and a webhook receiver (issue 11, cancellation).

100 generate tasks, each cancelled over HTTP at a random point within a few seconds of its
submission (pending, queued at a stage, or mid-generation), beside 20 embed tasks left alone.
Every cancelled task must end `cancelled` with one timeline entry and one webhook saying so, a
repeated DELETE must answer the same, WebSockets that follow a task get the `cancelled`
message once, and no model run may start after the task's cancel was answered: inference logs
each model run with the time of its cancel check and its task ids, which is what is counted.
"""

from __future__ import annotations

import collections
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from conveyor.local.process import ServiceProcess
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.stack import LocalStack
from conveyor.net import free_ports
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV

pytestmark = [pytest.mark.broker, pytest.mark.models, pytest.mark.timeout(600)]

TOKENS = '{"tok-acme": "acme", "tok-globex": "globex"}'
AUTH = {t: {"Authorization": f"Bearer tok-{t}"} for t in ("acme", "globex")}
CANCELLED, FILLERS = 100, 20
# Each cancel lands this long after its task's submission, uniformly: long enough to reach a
# task queued at a stage or generating, far shorter than a 400-token generation on a CPU.
CANCEL_WINDOW_S = (0.2, 4.0)
BUDGET = 400
# Counting to 500 runs to the token budget: no target can finish before its cancel.
PROMPT = "Count from 1 to 500, separated by commas."
RUN = re.compile(r"model run .* checked_at=([0-9.]+) task_ids=(\S+)")
STOPPED = re.compile(r"generated .* stopped_cancelled=(\d+)")


def _tasks(run: str, callback: str) -> list[dict[str, Any]]:
    tasks = []
    for i in range(CANCELLED + FILLERS):
        filler = i % 6 == 0  # 20 fillers among the 100
        body: dict[str, Any] = {
            "task_id": f"{run}-{'keep' if filler else 'cancel'}-{i:03d}",
            "kind": "embed" if filler else "generate",
            "input": f"A sentence to embed ({i})." if filler else PROMPT,
            "callback_url": callback,
        }
        if not filler:
            body["params"] = {"max_new_tokens": BUDGET}
        tasks.append(body)
    return tasks


def _follow(base: str, task_id: str, tenant: str, into: list[dict[str, Any]]) -> None:
    import json

    ws_url = base.replace("http://", "ws://") + f"/v1/tasks/{task_id}/events"
    with connect(ws_url, additional_headers=AUTH[tenant], open_timeout=30) as ws:
        for raw in ws:  # ends when the server closes after the terminal message
            into.append(json.loads(raw))


def test_a_hundred_tasks_cancelled_at_random_points_end_cancelled_once_and_none_runs_after(
    kafka_bootstrap: str, topic_prefix: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        **WEBHOOK_ENV,
        "CONVEYOR_RETRY_DELAYS": "[1, 2, 4]",
        "OTEL_SDK_DISABLED": "true",
    }
    # Batches of 8: the first generations are under way when their cancels come.
    inference = {"CONVEYOR_BATCH_MAX": "8", "CONVEYOR_BATCH_WAIT_MS": "50"}
    stack = LocalStack(tmp_path, env, per_service={"inference": inference})
    (port,) = free_ports(1)
    gateway = ServiceProcess(
        "gateway",
        {
            **env,
            "CONVEYOR_GATEWAY_PORT": str(port),
            "CONVEYOR_GATEWAY_TOKENS": TOKENS,
            "CONVEYOR_PUBLISH_TIMEOUT_S": "30",  # a broker shared with other runs on 2 cores
        },
        tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    stack.apply_topics()
    rng = random.Random(11)
    run = topic_prefix.strip(".")
    tasks = _tasks(run, receiver.url)
    tenant_of = {t["task_id"]: ("acme", "globex")[n % 2] for n, t in enumerate(tasks)}
    targets = [t["task_id"] for t in tasks if "-cancel-" in t["task_id"]]
    answers: dict[str, tuple[int, dict[str, Any], float]] = {}
    sockets: dict[str, list[dict[str, Any]]] = {t: [] for t in targets[:4]}
    followers: list[threading.Thread] = []
    try:
        stack.start()
        gateway.start()
        gateway.wait_ready(120)
        _warm_up(base, store_url, run, receiver.url)
        delays = {t: rng.uniform(*CANCEL_WINDOW_S) for t in targets}
        posted: dict[str, int] = {}
        with httpx.Client(base_url=base, timeout=60) as http, ThreadPoolExecutor(32) as pool:

            def cancel(task_id: str, at: float) -> None:
                time.sleep(max(0.0, at - time.monotonic()))
                answer = http.delete(f"/v1/tasks/{task_id}", headers=AUTH[tenant_of[task_id]])
                answers[task_id] = (answer.status_code, answer.json(), time.time())

            def submit(task: dict[str, Any]) -> None:
                task_id = task["task_id"]
                answer = http.post("/v1/tasks", json=task, headers=AUTH[tenant_of[task_id]])
                posted[task_id] = answer.status_code
                if task_id in sockets:  # followed from its acceptance on
                    follower = threading.Thread(
                        target=_follow, args=(base, task_id, tenant_of[task_id], sockets[task_id])
                    )
                    follower.start()
                    followers.append(follower)
                if task_id in targets:  # its random point counts from its acceptance
                    pool.submit(cancel, task_id, time.monotonic() + delays[task_id])

            started = time.monotonic()
            with ThreadPoolExecutor(8) as posters:
                list(posters.map(submit, tasks))
            submitted_s = time.monotonic() - started
        assert set(posted.values()) == {202}, posted
        cancels_done_s = time.monotonic() - started
        store = open_store(store_url)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = [store.get(t, tenant=tenant_of[t]) for t in tenant_of]
            if (
                all(r is not None and r.terminal for r in rows)
                and len(receiver.snapshot()) >= len(tasks) + 2
            ):  # the warm-up's too
                break
            assert not stack.supervise(), "a service died"
            time.sleep(0.5)
        time.sleep(2.0)  # any duplicate webhook would arrive now
        finished_s = time.monotonic() - started
        rows_by_id = {t: store.get(t, tenant=tenant_of[t]) for t in tenant_of}
        timelines = {t: store.timeline(t, tenant=tenant_of[t]) for t in targets}
        store.close()
        with httpx.Client(base_url=base, timeout=60) as http:
            repeats = {
                t: http.delete(f"/v1/tasks/{t}", headers=AUTH[tenant_of[t]]) for t in targets
            }
        # The repeats republished every cancel; notify must find each already notified.
        notify_log = stack.procs["notify"].log_path
        deadline = time.monotonic() + 120
        while _already_notified(notify_log) < CANCELLED and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # a second webhook, were one sent, would have arrived by now
        deduplicated = _already_notified(notify_log)
        for follower in followers:
            follower.join(30)
        skipped = {name: _skipped(proc.metrics()) for name, proc in stack.procs.items()}
    finally:
        gateway.stop()
        stack.stop()
    logs = "\n".join(f"--- {p.label}\n{p.tail(15)}" for p in [*stack.procs.values(), gateway])

    # Every cancel was accepted; a repeat answers the same.
    codes = collections.Counter(code for code, _, _ in answers.values())
    assert codes == {200: CANCELLED}, (codes, logs)
    for task_id in targets:
        code, body, _ = answers[task_id]
        assert body["cancelled"] is True and body["status"] == "cancelled", body
        assert (repeats[task_id].status_code, repeats[task_id].json()) == (200, body)

    assert deduplicated >= CANCELLED, deduplicated  # every republished cancel came through

    # Each ends cancelled, once in its timeline; the fillers complete.
    statuses = collections.Counter(r.status for r in rows_by_id.values() if r is not None)
    assert statuses == {"cancelled": CANCELLED, "completed": FILLERS}, (statuses, logs)
    for task_id in targets:
        entries = [e.status for e in timelines[task_id]]
        assert entries.count("cancelled") == 1, (task_id, entries)

    # One webhook per task, saying what the store says.
    deliveries = receiver.snapshot()
    deliveries = [d for d in deliveries if d.task_id in tenant_of]  # not the warm-up's
    per_task = collections.Counter(d.task_id for d in deliveries)
    assert len(deliveries) == len(tasks) and set(per_task) == set(tenant_of), per_task
    assert all(d.signature_ok for d in deliveries)
    for d in deliveries:
        expected = "cancelled" if d.task_id in targets else "completed"
        assert d.body["status"] == expected, d.body

    # WebSockets that followed a task from its submission got `cancelled` exactly once.
    for task_id, messages in sockets.items():
        final = [m for m in messages if m["status"] == "cancelled"]
        assert len(final) == 1 and final[0]["final"] is True, (task_id, messages)
        assert messages[-1] is final[0]

    # No model run started after its task's cancel was answered.
    runs = _model_runs(stack.procs["inference"].log_path)
    late = [
        (task_id, checked, answers[task_id][2])
        for checked, ids in runs
        for task_id in ids
        if task_id in answers and checked >= answers[task_id][2]
    ]
    assert not late, late
    run_targets = {t for _, ids in runs for t in ids if t in answers}
    stopped = _stopped(stack.procs["inference"].log_path)
    # The run reached the paths it is about: some targets were generating when cancelled.
    assert run_targets and stopped >= 1, (run_targets, stopped, logs)
    print(
        f"\ncancel e2e: submitted {len(tasks)} in {submitted_s:.1f}s, cancels answered by "
        f"{cancels_done_s:.1f}s, all terminal + webhooks by {finished_s:.1f}s; "
        f"targets reaching a model before their cancel: {len(run_targets)}, "
        f"generations stopped mid-way: {stopped}, runs after a cancel: {len(late)}; "
        f"skipped per stage: {skipped}"
    )


def _warm_up(base: str, store_url: str, run: str, callback: str) -> None:
    """One task of each kind through every stage first, so each stage has joined its group and
    loaded what it loads lazily (preprocess: the generate model's tokenizer): the cancels then
    meet the tasks where a running pipeline has them. Their webhooks are the first two."""
    warm = [
        {
            "task_id": f"{run}-warm-{kind}",
            "kind": kind,
            "input": "warm up",
            "callback_url": callback,
        }
        for kind in ("embed", "generate")
    ]
    warm[1]["params"] = {"max_new_tokens": 1}
    with httpx.Client(base_url=base, timeout=60) as http:
        for task in warm:
            assert http.post("/v1/tasks", json=task, headers=AUTH["acme"]).status_code == 202
    store = open_store(store_url)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = [store.get(task["task_id"], tenant="acme") for task in warm]
            if all(row is not None and row.terminal for row in rows):
                assert all(row is not None and row.status == "completed" for row in rows), rows
                return
            time.sleep(0.2)
        raise AssertionError("the warm-up tasks did not complete")
    finally:
        store.close()


def _already_notified(log: Path) -> int:
    text = log.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "reason=already-notified" in line)


def _model_runs(log: Path) -> list[tuple[float, list[str]]]:
    runs = []
    for line in log.read_text(errors="replace").splitlines():
        if match := RUN.search(line):
            runs.append((float(match.group(1)), match.group(2).split(",")))
    return runs


def _stopped(log: Path) -> int:
    return sum(int(m.group(1)) for m in STOPPED.finditer(log.read_text(errors="replace")))


def _skipped(metrics: str) -> int:
    found = re.findall(r"^conveyor_cancelled_skipped_total\{[^}]*\} ([0-9.e+]+)$", metrics, re.M)
    return int(sum(float(v) for v in found))
