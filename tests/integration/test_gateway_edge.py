"""Edge hygiene against the real gateway (uvicorn on a free 127.0.0.1 port, the real broker) and
the real preprocess service: a trickling body is cut off; at DEBUG, with uvicorn's access log on,
no log line carries a token; the files the gateway creates are private; a task with an
out-of-range parameter published by a Kafka producer ends `failed` with the parameter named.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from conveyor.events.catalog import INGRESS_TOPIC, STATUS_TOPIC
from conveyor.events.model import AVRO
from conveyor.local.process import ServiceProcess
from conveyor.net import free_ports
from conveyor.web.auth import SUBPROTOCOL, token_subprotocol
from tests.integration.test_gateway import (
    Running,
    gateway,  # noqa: F401  (fixture)
    wait_for,
)
from tests.support import apply, headers_of, produce_structured, read_topics, task_doc

pytestmark = pytest.mark.timeout(240)

SECRET_TOKEN = "tok-never-logged-7f3a"


def raw_post(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok-acme\r\n"
        "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


def test_trickling_body_is_cut_off_with_408_after_the_read_timeout(
    gateway: Running,  # noqa: F811
) -> None:
    timeout_s = gateway.settings.body_timeout_s
    sock = raw_post(gateway.url)
    started = time.monotonic()
    answer = b""
    try:
        sock.settimeout(0.5)
        # One byte every 0.5 s, as a slow-loris client does, for at most 60 s.
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 60:
            with contextlib.suppress(OSError):  # the server may already have closed its side
                sock.sendall(b" ")
            try:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                continue
    finally:
        sock.close()
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed >= timeout_s * 0.9  # cut off by the timeout, not earlier for another reason


def test_no_log_line_carries_a_token_at_debug_and_created_files_are_private(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    port = free_ports()[0]
    state = tmp_path / "var" / "state"  # does not exist yet: the gateway creates it
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_GATEWAY_PORT": str(port),
        "CONVEYOR_GATEWAY_TOKENS": json.dumps({SECRET_TOKEN: "acme"}),
        "CONVEYOR_STORE_URL": f"sqlite:///{state / 'conveyor.db'}",
        "CONVEYOR_LOG_LEVEL": "DEBUG",
        "CONVEYOR_ACCESS_LOG": "true",
        "CONVEYOR_PUBLISH_TIMEOUT_S": "30",  # the broker is shared with other runs on two cores
    }
    process = ServiceProcess("gateway", env, tmp_path / "logs")
    process.start()
    base = f"http://127.0.0.1:{port}"
    ws_base = f"ws://127.0.0.1:{port}/v1/tasks"
    bearer = {"Authorization": f"Bearer {SECRET_TOKEN}"}
    try:
        process.wait_ready(60)
        with httpx.Client(base_url=base, timeout=30) as http:
            wait_for(lambda: http.get("/readyz").status_code == 200, "the HTTP port")
            task = {"task_id": "log-1", "kind": "embed", "input": "hi"}
            assert http.post("/v1/tasks", headers=bearer, json=task).status_code == 202
            assert http.get("/v1/tasks/log-1", headers=bearer).status_code == 200
            assert http.get("/v1/tasks/log-1", params={"token": SECRET_TOKEN}).status_code == 401
        offered = [SUBPROTOCOL, token_subprotocol(SECRET_TOKEN)]
        with connect(f"{ws_base}/log-1/events", subprotocols=offered, open_timeout=10) as ws:  # type: ignore[arg-type]
            assert json.loads(ws.recv(timeout=10))["task_id"] == "log-1"
        with connect(f"{ws_base}/log-1/events", additional_headers=bearer, open_timeout=10) as ws:
            ws.recv(timeout=10)
        for url in (f"{ws_base}/log-1/events?token={SECRET_TOKEN}", f"{ws_base}/nope/events"):
            with pytest.raises(InvalidStatus):
                connect(url, additional_headers=bearer, open_timeout=10)
        db = state / "conveyor.db"
        modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (state, db, process.log_path)}
    finally:
        code = process.stop(30)
    log = process.log_path.read_text(errors="replace")
    assert code == 0, process.tail()
    assert "DEBUG" in log and "websocket" in log.lower()  # the debug lines are there ...
    for form in (SECRET_TOKEN, token_subprotocol(SECRET_TOKEN).removeprefix("bearer.")):
        assert form not in log  # ... and no token in any of them
    assert modes == {state: 0o700, db: 0o600, process.log_path: 0o600}, modes


def test_kafka_producer_task_with_bad_params_ends_failed_with_the_parameter_named(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    good = task_doc("kp-good", kind="embed", tenant="globex")
    poisoned = task_doc(
        "kp-bad", kind="generate", text="hi", params={"do_sample": True, "seed": 1e30}
    )
    produce_structured(kafka_bootstrap, topic_prefix + INGRESS_TOPIC, [poisoned, good])
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_TOKENIZERS": "false",
        "OTEL_SDK_DISABLED": "true",
    }
    process = ServiceProcess("preprocess", env, tmp_path)
    process.start()
    try:
        process.wait_ready(120)
        status = read_topics(kafka_bootstrap, [topic_prefix + STATUS_TOPIC], expect=1)
        lanes = [f"{topic_prefix}conveyor.task.preprocessed.{lane}" for lane in ("normal",)]
        passed = read_topics(kafka_bootstrap, lanes, expect=1)
    finally:
        process.stop(30)
    assert [m.key() for m in passed] == [b"kp-good"]  # the other tenant's task went on
    [failed] = status
    assert failed.key() == b"kp-bad"
    assert headers_of(failed)["content-type"] == AVRO
    from conveyor.events.avro import default_schemas
    from conveyor.events.codec import decode

    event = decode(failed.headers() or [], failed.value(), default_schemas())  # type: ignore[arg-type]
    assert event.data["status"] == "failed"
    assert "params.seed" in event.data["reason"], event.data
