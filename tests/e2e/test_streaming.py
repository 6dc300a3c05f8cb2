"""Streamed generation through every service as a process: the gateway, the five stages, the
real broker, SmolLM2 and the real moderation signals (issue 12, "Streaming").

A WebSocket client of a streaming generate task receives partial text, chunk by chunk, before
the final result, and the text the chunks build is the stored result, which the webhook carries
too. A non-streaming task's socket gets status messages only. A streaming task whose input the
moderation policy refuses shows no partial text at all (the stream ends `moderation`) and ends
`blocked` as it would without streaming.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conveyor.local.process import SERVICES
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.samples import PROFANE
from conveyor.local.stack import LocalStack
from conveyor.net import free_ports
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV

pytestmark = [pytest.mark.broker, pytest.mark.models, pytest.mark.timeout(600)]
TOKENS = json.dumps({"tok-acme": "acme"})
ACME = {"Authorization": "Bearer tok-acme"}
QUESTION = "Write three sentences about rivers."
FOLLOW_S = 300.0  # every socket ends long before this on a quiet machine; a loaded one is slow


def follow(ws_url: str) -> list[tuple[float, dict[str, Any]]]:
    """Every message of one task's socket, with its arrival time, until the server closes it."""
    got: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + FOLLOW_S
    with connect(ws_url, additional_headers=ACME, open_timeout=30) as ws:
        while time.monotonic() < deadline:
            try:
                raw = ws.recv(timeout=deadline - time.monotonic())
            except (ConnectionClosed, TimeoutError):
                break
            got.append((time.monotonic(), json.loads(raw)))
    return got


def rebuilt(messages: list[dict[str, Any]]) -> str:
    """The partial text as a reader builds it: text = text[:offset] + chunk."""
    text = ""
    for m in messages:
        if m.get("type") == "chunk":
            text = text[: m["offset"]] + m["text"]
    return text


def test_websocket_gets_partial_text_before_the_result_which_equals_the_stored_text(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, receiver: WebhookReceiver
) -> None:
    store_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    [port] = free_ports(1)
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        "OTEL_SDK_DISABLED": "true",
        **WEBHOOK_ENV,
    }
    gateway = {"CONVEYOR_GATEWAY_PORT": str(port), "CONVEYOR_GATEWAY_TOKENS": TOKENS}
    # One torch thread: on a machine shared by many test runs, two spinning intra-op threads
    # made each decoding step several times slower; streaming is what is under test here.
    per_service = {"gateway": gateway, "inference": {"OMP_NUM_THREADS": "1"}}
    stack = LocalStack(tmp_path, env, services=(*SERVICES, "gateway"), per_service=per_service)
    stack.apply_topics(partitions=2)
    base = f"http://127.0.0.1:{port}"
    tasks = {
        "stream-1": {"input": QUESTION, "params": {"max_new_tokens": 24, "stream": True}},
        "plain-1": {"input": QUESTION, "params": {"max_new_tokens": 24}},
        "rude-1": {"input": PROFANE[0], "params": {"max_new_tokens": 8, "stream": True}},
    }
    try:
        stack.start()
        with httpx.Client(base_url=base, headers=ACME, timeout=60) as http:
            for task_id, body in tasks.items():
                task = {"task_id": task_id, "kind": "generate", "callback_url": receiver.url}
                answer = http.post("/v1/tasks", json={**task, **body})
                assert answer.status_code == 202, answer.text
        ws_base = base.replace("http://", "ws://")
        with ThreadPoolExecutor(len(tasks)) as pool:
            futures = {t: pool.submit(follow, f"{ws_base}/v1/tasks/{t}/events") for t in tasks}
            sockets = {t: f.result(FOLLOW_S + 60) for t, f in futures.items()}
        store = open_store(store_url)
        stored = {t: store.get(t, tenant="acme") for t in tasks}
        store.close()
        hooks = wait_for_webhooks(receiver, set(tasks))
    finally:
        stack.stop()
    logs = "\n".join(f"--- {p.label}\n{p.tail(20)}" for p in stack.procs.values())

    # The streaming task: several chunks, all before the final status, building the result.
    for task_id, got in sockets.items():
        assert got and got[-1][1].get("final"), (task_id, got[-3:], logs)
    timed = sockets["stream-1"]
    messages = [m for _, m in timed]
    final_at, final = timed[-1]
    chunks = [(t, m) for t, m in timed if m.get("type") == "chunk"]
    assert final["status"] == "completed", (final, logs)
    assert len(chunks) >= 2, (messages, logs)
    assert all(t <= final_at for t, _ in chunks)
    assert messages.index(final) == len(messages) - 1  # nothing after the final status
    ends = [m for m in messages if m.get("type") == "stream_end"]
    assert [m["reason"] for m in ends] == ["complete"]
    result_text = final["result"]["text"]
    record = stored["stream-1"]
    assert record is not None and record.status == "completed"
    assert rebuilt(messages) == result_text == record.result["text"] != ""
    assert hooks["stream-1"]["result"]["text"] == result_text  # the webhook is unchanged

    # The same question unstreamed: status messages only, and (greedy) the same text.
    plain = [m for _, m in sockets["plain-1"]]
    assert not [m for m in plain if "type" in m], plain
    assert plain[-1]["final"] and plain[-1]["result"]["text"] == result_text

    # A refused input: the stream ends at once, no partial text; the task is blocked as ever.
    rude = [m for _, m in sockets["rude-1"]]
    assert [m for m in rude if m.get("type") == "stream_end"] == [
        {"type": "stream_end", "task_id": "rude-1", "reason": "moderation"}
    ], rude
    assert rebuilt(rude) == ""
    assert rude[-1]["status"] == "blocked" and stored["rude-1"].status == "blocked"  # type: ignore[union-attr]


def wait_for_webhooks(receiver: WebhookReceiver, task_ids: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        bodies = {d.task_id: d.body for d in receiver.applied() if d.signature_ok}
        if task_ids <= set(bodies):
            return bodies
        time.sleep(0.2)
    raise AssertionError(f"webhooks missing: {task_ids - {d.task_id for d in receiver.snapshot()}}")
