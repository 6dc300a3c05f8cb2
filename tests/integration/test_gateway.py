"""The gateway over real sockets: uvicorn on a free 127.0.0.1 port, the real broker, httpx and a
real WebSocket client. A POSTed task is a CloudEvent on the ingress topic; the queue estimate
follows the preprocess group's committed offsets; the WebSocket pushes store changes and closes
after the terminal status; `python -m conveyor.services.gateway` starts, serves and drains on
SIGTERM."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka import Consumer, TopicPartition
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect

from conveyor.events.avro import default_schemas
from conveyor.events.catalog import INGRESS_TOPIC
from conveyor.events.codec import decode
from conveyor.local.process import ServiceProcess
from conveyor.net import free_ports
from conveyor.services.gateway.__main__ import build, uvicorn_config
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import ResultStore, TaskUpdate, open_store
from conveyor.web.auth import SUBPROTOCOL, token_subprotocol
from tests.support import apply, read_topics

pytestmark = pytest.mark.timeout(180)

TOKENS = {"tok-acme": "acme", "tok-beta": "beta"}
ACME = {"Authorization": "Bearer tok-acme"}
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@dataclass
class Running:
    url: str
    settings: GatewaySettings
    store: ResultStore  # a second connection to the gateway's SQLite file, as writeback has


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def gateway(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> Iterator[Running]:
    apply(kafka_bootstrap, topic_prefix, partitions=2)
    store_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    settings = GatewaySettings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=topic_prefix,
        gateway_tokens=TOKENS,
        store_url=store_url,
        gateway_port=0,
        ws_poll_s=0.05,
        lag_cache_s=0.2,
        # The broker is shared with other test runs on two cores.
        publish_timeout_s=30,
        lag_timeout_s=10,
    )
    app, _state = build(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    store = open_store(store_url)
    try:
        yield Running(f"http://{host}:{port}", settings, store)
    finally:
        store.close()
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def ingress(settings: GatewaySettings) -> str:
    return settings.topic(INGRESS_TOPIC)


def test_posted_task_is_a_cloudevent_on_the_ingress_topic_keyed_by_task_id(
    gateway: Running, kafka_bootstrap: str
) -> None:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/v1/tasks", json={"kind": "embed", "input": "hi"}).status_code == 401
        answer = http.post(
            "/v1/tasks", headers=ACME, json={"task_id": "gw-1", "kind": "embed", "input": "hello"}
        )
    assert answer.status_code == 202, answer.text
    assert answer.json()["status_url"] == "/v1/tasks/gw-1"  # no public_base_url: relative
    [msg] = read_topics(kafka_bootstrap, [ingress(gateway.settings)], expect=1, settle_s=0.5)
    headers = msg.headers() or []
    assert isinstance(headers, list)  # confluent-kafka returns a list of (key, value)
    event = decode(headers, msg.value(), default_schemas())
    assert msg.key() == b"gw-1"
    assert (event.type, event.subject, event.source) == (
        "conveyor.task.submitted.v1",
        "gw-1",
        "/conveyor/gateway",
    )
    assert event.extensions["tenant"] == "acme" and event.data["tenant"] == "acme"
    assert (event.data["kind"], event.data["input"]) == ("embed", "hello")


def test_queue_estimate_is_the_preprocess_groups_lag_on_the_ingress_topic(
    gateway: Running, kafka_bootstrap: str
) -> None:
    with httpx.Client(base_url=gateway.url, headers=ACME, timeout=30) as http:
        for n in range(3):
            task = {"task_id": f"q-{n}", "kind": "embed", "input": "hi"}
            assert http.post("/v1/tasks", json=task).status_code == 202
        first = http.get("/v1/tasks/q-0").json()
        assert first["status"] == "pending"
        wait_for(
            lambda: http.get("/v1/tasks/q-0").json()["queue_position_estimate"] == 3,
            "the estimate to count the three uncommitted records",
        )
        commit_everything(kafka_bootstrap, gateway.settings.lag_group, ingress(gateway.settings))
        wait_for(
            lambda: http.get("/v1/tasks/q-0").json()["queue_position_estimate"] == 0,
            "the estimate to follow the committed offsets",
        )


def commit_everything(bootstrap: str, group: str, topic: str) -> None:
    """Commit the high watermark of every partition, as preprocess does once it caught up."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = [
            TopicPartition(
                topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            )
            for p in partitions
        ]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def task_update(task_id: str, status: str, minute: int, **fields: Any) -> TaskUpdate:
    return TaskUpdate(
        task_id=task_id,
        event_id=f"{task_id}-{minute}",
        status=status,
        event_type="conveyor.task.test.v1",
        time=T0 + timedelta(minutes=minute),
        tenant="acme",
        kind="embed",
        **fields,
    )


def test_websocket_pushes_store_changes_and_closes_after_the_terminal_status(
    gateway: Running,
) -> None:
    store = gateway.store
    store.apply(task_update("ws-1", "processing", 0, stage="preprocess"))
    ws_url = gateway.url.replace("http://", "ws://") + "/v1/tasks/ws-1/events"
    with connect(ws_url, additional_headers=ACME, open_timeout=10) as ws:
        assert decoded(ws.recv(timeout=10))["stage"] == "preprocess"
        store.apply(task_update("ws-1", "retrying", 1, stage="inference", detail="attempt 1"))
        assert decoded(ws.recv(timeout=10))["status"] == "retrying"
        store.apply(
            task_update(
                "ws-1",
                "completed",
                2,
                stage="moderation",
                verdict="allow",
                result={"model": "m", "embedding": [0.5]},
            )
        )
        final = decoded(ws.recv(timeout=10))
        assert (final["status"], final["final"], final["result"]["embedding"]) == (
            "completed",
            True,
            [0.5],
        )
        with pytest.raises(ConnectionClosedOK):
            ws.recv(timeout=10)
    assert ws.close_code == 1000


def test_websocket_handshake_without_a_valid_token_is_refused_with_401(gateway: Running) -> None:
    gateway.store.apply(task_update("ws-2", "processing", 0, stage="preprocess"))
    ws_url = gateway.url.replace("http://", "ws://") + "/v1/tasks/ws-2/events"
    for url, protocols in (
        (ws_url, [SUBPROTOCOL, token_subprotocol("wrong")]),
        (ws_url + "?token=tok-acme", None),  # a valid token, but in the URL: refused
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, subprotocols=protocols, open_timeout=10)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 401
    # A browser's way: the token as a subprotocol; the server selects conveyor.v1, not the token.
    offered = [SUBPROTOCOL, token_subprotocol("tok-acme")]
    with connect(ws_url, subprotocols=offered, open_timeout=10) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == SUBPROTOCOL
        assert decoded(ws.recv(timeout=10))["task_id"] == "ws-2"


def decoded(text: str | bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


def test_gateway_process_serves_and_exits_cleanly_on_sigterm(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    port = free_ports()[0]
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_GATEWAY_PORT": str(port),
        "CONVEYOR_GATEWAY_TOKENS": '{"tok-acme": "acme"}',
        "CONVEYOR_STORE_URL": f"sqlite:///{tmp_path / 'conveyor.db'}",
    }
    process = ServiceProcess("gateway", env, tmp_path)
    process.start()
    try:
        process.wait_ready(60)  # /readyz on the metrics port, as for every stage
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_for(lambda: http.get("/readyz").status_code == 200, "the HTTP port")
            answer = http.post(
                "/v1/tasks",
                headers=ACME,
                json={"task_id": "proc-1", "kind": "embed", "input": "hi"},
            )
            assert answer.status_code == 202, answer.text
            assert http.get("/v1/tasks/proc-1", headers=ACME).json()["status"] == "pending"
            assert 'route="/v1/tasks"' in http.get("/metrics").text
    finally:
        code = process.stop(30)
    assert code == 0, process.tail()
